"""A merged Hugging Face model folder -> one GGUF file for llama.cpp, Ollama and Tabby, with working infill.

The conversion is llama.cpp's own ``convert_hf_to_gguf.py`` (from the pinned source archive that
:mod:`codetune.llama_cpp` fetches), run in a subprocess with the interpreter in use; nothing is compiled. Around
it codetune adds what the converter cannot know and then checks the file it wrote:

- the FIM token ids of the trained sentinel set (``tokenizer.ggml.fim_pre/suf/mid/pad_token_id``), the end of
  an infill as ``tokenizer.ggml.eot_token_id`` and whether a BOS is prepended (``tokenizer.ggml.add_bos_token``,
  as the Hugging Face tokenizer and so training did). llama.cpp otherwise guesses FIM tokens from their text and
  the BOS rule from the pre-tokenizer, and misses some: Code Llama's ``▁<EOT>`` is not among the texts it knows,
  so generation would run past the end of an infill.
- K-quants (``q4_k_m`` ...) are made by llama.cpp's ``llama-quantize`` when it is on ``PATH``; the converter
  itself writes ``f32``, ``f16``, ``bf16`` and ``q8_0``.
- After writing, the GGUF's metadata is read back (:mod:`codetune.exports.gguf_metadata`, checked against the
  ``gguf`` package's reader) and compared with the Hugging Face folder (:mod:`codetune.exports.gguf_check`): FIM
  tokens present at the trained ids with the trained text and a special type, EOS/EOT/BOS, the vocabulary, the
  context length and the RoPE base and scaling of a long-context run. A file that fails is not published.

Bad input fails in one line before any conversion: an adapter-only folder, an architecture the converter does
not support, an unknown output type, a K-quant without ``llama-quantize``, an existing output file.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from codetune.data.tokenizer import FIMSentinels
from codetune.exports.gguf_check import (
    GgufExpectations,
    adds_repository_tokens,
    check_gguf,
    expected_contents,
    infill_endpoint_notes,
    read_ids,
    read_rope,
)
from codetune.exports.gguf_metadata import ADD_BOS_KEY, ARCHITECTURE_KEY
from codetune.llama_cpp import PACKAGE, VERSION, llama_cpp_dir

log = logging.getLogger(__name__)

GgufOutType = Literal[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
    "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
]  # fmt: skip
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
"""Written by llama.cpp's converter itself."""
QUANTIZE_OUTTYPES = tuple(t for t in GgufOutType.__args__ if t not in CONVERTER_OUTTYPES)
"""Written by ``llama-quantize`` from an f16/bf16 conversion."""
QUANTIZE_TOOL = "llama-quantize"


@dataclass(frozen=True)
class GgufExport:
    """One verified GGUF file and what the editor set-ups need to know about it."""

    path: Path
    outtype: str
    name: str
    """``general.name``; the model name suggested for Ollama, Tabby and Continue."""
    architecture: str
    """The Hugging Face architecture converted (``config.json``), e.g. ``Starcoder2ForCausalLM``."""
    gguf_architecture: str
    """llama.cpp's name for it (``general.architecture``), e.g. ``starcoder2``."""
    sentinels: FIMSentinels | None
    """The FIM sentinel set the model carries; None: no infilling."""
    sentinel_set: str | None
    """Its name in :data:`codetune.data.tokenizer.SENTINEL_SETS`, when it is a known set."""
    token_ids: dict[str, int]
    """As read back: ``prefix``/``suffix``/``middle``/``pad`` FIM ids, ``end`` (EOT), ``eos``, ``bos``."""
    eos_token: str | None
    """The end-of-sequence token's text."""
    add_bos: bool
    """llama.cpp prepends BOS to a prompt (as the Hugging Face tokenizer does)."""
    context_length: int | None
    rope: dict[str, Any]
    """RoPE metadata as read back, e.g. ``{"freq_base": 1e6, "scaling.type": "linear", "scaling.factor": 4.0}``."""
    size_bytes: int
    seconds: float
    """Wall time of the conversion (and quantization) in this process."""
    infill_endpoint: bool
    """llama-server's ``/infill`` builds exactly the trained PSM prompt (no repository tokens are prepended)."""
    notes: tuple[str, ...] = ()
    """What a user of the file should know (e.g. a RoPE type llama.cpp cannot represent)."""

    def stop_strings(self) -> list[str]:
        """Texts that end an infill: the FIM end sentinel, the EOS token, and the FIM markers themselves."""
        s = self.sentinels
        found = [] if s is None else [s.end, s.prefix, s.suffix, s.middle]
        return list(dict.fromkeys(found + ([self.eos_token] if self.eos_token else [])))


def export_gguf(
    hf_folder: str | Path,
    out: str | Path,
    outtype: GgufOutType = "f16",
    name: str | None = None,
    sentinels: str | FIMSentinels | None = None,
    overwrite: bool = False,
    cache_dir: str | None = None,
) -> GgufExport:
    """Convert a merged Hugging Face model folder to one verified GGUF file.

    Args:
        hf_folder: A folder with ``config.json``, safetensors weights and the tokenizer (what ``codetune export``
            writes without ``--adapter_only``).
        out: The ``.gguf`` file to write; written under a temporary name and renamed once verified.
        outtype: Weight type: ``f32``/``f16``/``bf16``/``q8_0`` (llama.cpp's converter) or a llama.cpp quant such
            as ``q4_k_m`` (needs ``llama-quantize`` on ``PATH``).
        name: Model name stored in the file (``general.name``); default: the folder's name.
        sentinels: The FIM sentinel set the model was trained with (a name in ``SENTINEL_SETS`` or custom
            strings); default: the known set the tokenizer carries, if any.
        overwrite: Replace an existing ``out``.
        cache_dir: Where llama.cpp's files are cached (default ``$CODETUNE_CACHE``).

    Returns:
        The written file with what was verified in it.
    """
    hf_folder, out = Path(hf_folder).expanduser(), Path(out).expanduser()
    config = check_hf_folder(hf_folder)
    tool = check_outtype(outtype)
    if out.suffix != ".gguf":
        raise ValueError(f"GGUF output {out}: give a file path ending in .gguf")
    if out.exists() and not overwrite:
        raise FileExistsError(f"GGUF output {out} exists; pass overwrite=True (--overwrite) to replace it")
    llama = llama_cpp_dir(cache_dir)
    check_architecture(config, llama)
    expected = expected_contents(hf_folder, config, sentinels)
    name = name or hf_folder.resolve().name

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.partial-") as tmp:
        work = Path(tmp)
        converted = work / f"{out.stem}.gguf"
        if tool is None:
            _convert(llama, hf_folder, converted, outtype, name, expected)
            final = converted
        else:
            intermediate = (
                "bf16" if str(config.get("torch_dtype", config.get("dtype"))) == "bfloat16" else "f16"
            )
            _convert(llama, hf_folder, work / "unquantized.gguf", intermediate, name, expected)
            final = work / f"{out.stem}.{outtype}.gguf"
            _quantize(tool, work / "unquantized.gguf", final, outtype)
        facts = check_gguf(final, expected)
        os.chmod(final, 0o666 & ~_umask())
        os.replace(final, out)
    seconds = time.perf_counter() - start
    log.info("wrote %s (%s, %.1f MB) in %.1f s", out, outtype, out.stat().st_size / 1e6, seconds)
    return GgufExport(
        path=out,
        outtype=outtype,
        name=name,
        architecture=expected.architecture,
        gguf_architecture=facts[ARCHITECTURE_KEY],
        sentinels=expected.sentinels,
        sentinel_set=expected.sentinel_set,
        token_ids=read_ids(facts),
        eos_token=expected.eos_token,
        add_bos=bool(facts.get(ADD_BOS_KEY, False)),
        context_length=facts.get(f"{facts[ARCHITECTURE_KEY]}.context_length"),
        rope=read_rope(facts),
        size_bytes=out.stat().st_size,
        seconds=seconds,
        infill_endpoint=not adds_repository_tokens(facts),
        notes=expected.notes + infill_endpoint_notes(facts, expected),
    )


# ---- checks before any conversion --------------------------------------------------------------------------


def check_hf_folder(hf_folder: Path) -> dict[str, Any]:
    """The folder's ``config.json``; refuse a folder that is not a merged model with weights and a tokenizer."""
    if not hf_folder.is_dir():
        raise FileNotFoundError(f"GGUF export: {hf_folder} is not a folder")
    config_file = hf_folder / "config.json"
    if (hf_folder / "adapter_config.json").is_file() and not config_file.is_file():
        raise ValueError(
            f"GGUF export: {hf_folder} is an adapter-only folder (adapter_config.json, no config.json); export the "
            "merged model first (`codetune export` without --adapter_only) and convert that folder"
        )
    if not config_file.is_file():
        raise FileNotFoundError(f"GGUF export: {config_file} is missing; give a Hugging Face model folder")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if not any(hf_folder.glob("*.safetensors")) and not any(hf_folder.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"GGUF export: {hf_folder} has no weights (*.safetensors)")
    if (hf_folder / "tokenizer.model").is_file() and importlib.util.find_spec("sentencepiece") is None:
        raise ModuleNotFoundError(
            f"GGUF export: {hf_folder} has a SentencePiece tokenizer.model, which llama.cpp's converter reads with "
            "the sentencepiece package: pip install 'codetune[gguf]'"
        )
    if not (hf_folder / "tokenizer.json").is_file() and not (hf_folder / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"GGUF export: {hf_folder} has no tokenizer (tokenizer.json or tokenizer.model)"
        )
    return config


def check_gguf_options(outtype: str, architecture: str | None = None, cache_dir: str | None = None) -> None:
    """What an export command can check before loading any weights: the output type (and ``llama-quantize``
    for a quantized one) and, when known, the Hugging Face architecture the checkpoint will be saved as."""
    check_outtype(outtype)
    if architecture is not None:
        check_architecture({"architectures": [architecture]}, llama_cpp_dir(cache_dir))


def check_outtype(outtype: str) -> str | None:
    """The ``llama-quantize`` executable a quantized ``outtype`` needs (None: the converter writes it)."""
    if outtype in CONVERTER_OUTTYPES:
        return None
    if outtype not in QUANTIZE_OUTTYPES:
        raise ValueError(
            f"GGUF outtype {outtype!r} is unknown: use one of {', '.join(CONVERTER_OUTTYPES + QUANTIZE_OUTTYPES)}"
        )
    tool = shutil.which(QUANTIZE_TOOL)
    if tool is None:
        raise FileNotFoundError(
            f"GGUF outtype {outtype!r} needs llama.cpp's `{QUANTIZE_TOOL}` on PATH and none was found: install "
            "llama.cpp (`brew install llama.cpp`, a release archive from https://github.com/ggml-org/llama.cpp/"
            f"releases, or the ghcr.io/ggml-org/llama.cpp:full image), or export with outtype f16, bf16 or q8_0 "
            f"and run `{QUANTIZE_TOOL} model-f16.gguf model-{outtype}.gguf {outtype.upper()}` where it is installed"
        )
    return tool


def supported_architectures(llama: Path) -> list[str]:
    """Hugging Face architectures llama.cpp's converter turns into a text model (``TEXT_MODEL_MAP`` of its
    ``conversion`` package), read from its source so that nothing heavy is imported."""
    tree = ast.parse((llama / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = (
            node.target
            if isinstance(node, ast.AnnAssign)
            else (node.targets[0] if isinstance(node, ast.Assign) else None)
        )
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
            return sorted(ast.literal_eval(node.value))
    raise RuntimeError(f"{llama}/conversion/__init__.py has no TEXT_MODEL_MAP; the converter layout changed")


def check_architecture(config: dict[str, Any], llama: Path) -> str:
    """The folder's architecture, if the converter supports it; else one line naming it and the supported ones."""
    architectures = config.get("architectures") or []
    supported = supported_architectures(llama)
    if not architectures:
        raise ValueError(
            "GGUF export: config.json names no `architectures`; save the model with save_pretrained"
        )
    if architectures[0] not in supported:
        raise ValueError(
            f"GGUF export: architecture {architectures[0]} (config.json) is not supported by llama.cpp's converter "
            f"({PACKAGE} {VERSION}); supported: {', '.join(supported)}"
        )
    return architectures[0]


# ---- conversion -------------------------------------------------------------------------------------------


def _convert(
    llama: Path, hf_folder: Path, target: Path, outtype: str, name: str, expected: GgufExpectations
) -> None:
    plan = target.with_suffix(".keys.json")
    plan.write_text(
        json.dumps({"keys": expected.keys, "fallback_pre": expected.fallback_pre}), encoding="utf-8"
    )
    command = [
        sys.executable,
        str(Path(__file__).with_name("llama_cpp_converter.py")),
        str(llama),
        str(plan),
        "--",
        str(hf_folder),
        "--outfile",
        str(target),
        "--outtype",
        outtype,
        "--model-name",
        name,
    ]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["HF_HUB_OFFLINE"] = "1"  # the converter reads the local folder; it must not reach for the Hub
    log.info("converting %s to GGUF (%s) with llama.cpp's converter", hf_folder, outtype)
    done = subprocess.run(command, env=env, capture_output=True, text=True, errors="replace")
    if done.returncode != 0 or not target.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"llama.cpp's converter failed on {hf_folder} (exit {done.returncode}):\n{tail}")


def _quantize(tool: str, source: Path, target: Path, outtype: str) -> None:
    done = subprocess.run(
        [tool, str(source), str(target), outtype.upper()], capture_output=True, text=True, errors="replace"
    )
    if done.returncode != 0 or not target.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{tool} failed making {outtype} (exit {done.returncode}):\n{tail}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
