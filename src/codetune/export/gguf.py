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
- After writing, the GGUF's metadata is read back with the ``gguf`` package and compared with the Hugging Face
  folder: FIM tokens present at the trained ids with the trained text and a special type, EOS/EOT/BOS, the
  vocabulary, the context length and the RoPE base and scaling of a long-context run. A file that fails is not
  published.

Bad input fails in one line before any conversion: an adapter-only folder, an architecture the converter does
not support, an unknown output type, a K-quant without ``llama-quantize``, an existing output file.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from codetune.data.tokenizer import SENTINEL_SETS, FIMSentinels, carried_sentinel_sets, resolve_sentinels
from codetune.export.gguf_metadata import (
    ADD_BOS_KEY,
    ADD_EOS_KEY,
    ARCHITECTURE_KEY,
    BOS_KEY,
    CONTROL,
    EOS_KEY,
    EOT_KEY,
    FIM_KEYS,
    FIM_REP_KEY,
    FIM_SEP_KEY,
    TENSORS,
    TOKEN_TYPE_KEY,
    TOKENS_KEY,
    USER_DEFINED,
    read_gguf_metadata,
)
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

# Token texts llama.cpp (this pinned version, src/llama-vocab.cpp) takes as FIM_REP / FIM_SEP when no key names
# them; llama-server's /infill then prepends `<rep>myproject\n<sep>filename\n` to every prompt.
_LLAMA_CPP_REPO_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_LLAMA_CPP_FILE_SEP_TEXTS = ("<|file_sep|>",)


class GgufCheckError(ValueError):
    """A GGUF file does not carry what its Hugging Face folder says (FIM tokens, EOS, RoPE, ...)."""


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


@dataclass(frozen=True)
class _Expected:
    """What the GGUF must carry, read from the Hugging Face folder before converting."""

    architecture: str
    vocab_rows: int
    sentinels: FIMSentinels | None
    sentinel_set: str | None
    token_ids: dict[str, int]
    token_texts: dict[int, str]
    eos_token: str | None
    add_bos: bool
    add_eos: bool
    keys: dict[str, tuple[str, Any]]
    fallback_pre: str | None
    context_length: int | None
    rope: dict[str, Any]
    needs_tensors: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


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
        token_ids=_read_ids(facts),
        eos_token=expected.eos_token,
        add_bos=bool(facts.get(ADD_BOS_KEY, False)),
        context_length=facts.get(f"{facts[ARCHITECTURE_KEY]}.context_length"),
        rope=_read_rope(facts),
        size_bytes=out.stat().st_size,
        seconds=seconds,
        infill_endpoint=not _adds_repository_tokens(facts),
        notes=expected.notes + _infill_endpoint_notes(facts, expected),
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
    if not (hf_folder / "tokenizer.json").is_file() and not (hf_folder / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"GGUF export: {hf_folder} has no tokenizer (tokenizer.json or tokenizer.model)"
        )
    return config


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


def expected_contents(
    hf_folder: Path, config: dict[str, Any], sentinels: str | FIMSentinels | None = None
) -> _Expected:
    """What the GGUF of ``hf_folder`` must carry: FIM ids and texts, EOS/BOS rules, context and RoPE."""
    from transformers import AutoTokenizer  # heavy: only when a folder is exported

    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder))
    vocab = tokenizer.get_vocab()
    chosen, set_name = _sentinels_of(vocab, sentinels)
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    ids: dict[str, int] = {}
    if chosen is not None:
        for role in ("prefix", "suffix", "middle", "end", "pad"):
            token = getattr(chosen, role)
            if token is None:
                continue
            if token not in special and token != tokenizer.eos_token:
                raise ValueError(
                    f"GGUF export: FIM sentinel {token!r} is in {hf_folder}'s vocabulary but not a special token, "
                    "so llama.cpp would split its text; build the tokenizer with codetune.data.tokenizer."
                    "build_tokenizer (it registers the sentinels as special)"
                )
            ids[role] = vocab[token]
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    if eos is not None:
        ids["eos"] = eos
    if bos is not None:
        ids["bos"] = bos
    probe = tokenizer("a").input_ids
    add_bos = bos is not None and probe[:1] == [bos]
    add_eos = eos is not None and probe[-1:] == [eos] and len(probe) > 1
    keys: dict[str, tuple[str, Any]] = {ADD_BOS_KEY: ("bool", add_bos), ADD_EOS_KEY: ("bool", add_eos)}
    for role, key in FIM_KEYS.items():
        if role in ids:
            keys[key] = ("uint32", ids[role])
    if "end" in ids:
        keys[EOT_KEY] = ("uint32", ids["end"])
    rope, tensors, notes = _rope_expectations(config)
    text_config = config.get("text_config") or {}
    return _Expected(
        architecture=config["architectures"][0],
        vocab_rows=int(config.get("vocab_size") or text_config.get("vocab_size") or len(tokenizer)),
        sentinels=chosen,
        sentinel_set=set_name,
        token_ids=ids,
        token_texts={
            i: tokenizer.convert_ids_to_tokens(i) for r, i in ids.items() if r not in ("eos", "bos")
        },
        eos_token=tokenizer.eos_token,
        add_bos=add_bos,
        add_eos=add_eos,
        keys=keys,
        fallback_pre=_fallback_pre_tokenizer(hf_folder),
        context_length=config.get("max_position_embeddings", config.get("n_positions")),
        rope=rope,
        needs_tensors=tensors,
        notes=tuple(notes)
        + (
            ()
            if chosen is not None
            else ("the tokenizer carries no FIM sentinel set: infilling is unavailable",)
        ),
    )


def _sentinels_of(
    vocab: dict[str, int], sentinels: str | FIMSentinels | None
) -> tuple[FIMSentinels | None, str | None]:
    if sentinels is not None:
        chosen = resolve_sentinels(sentinels)
        missing = [t for t in chosen.tokens() if t not in vocab]
        if missing:
            raise ValueError(
                f"GGUF export: the tokenizer lacks the FIM sentinels {missing} of the requested set; the model "
                f"carries {carried_sentinel_sets(vocab) or 'no known set'}"
            )
        known = [n for n, s in SENTINEL_SETS.items() if s == chosen]
        return chosen, known[0] if known else None
    carried = carried_sentinel_sets(vocab)
    if not carried:
        return None, None
    return SENTINEL_SETS[carried[0]], carried[0]


def _fallback_pre_tokenizer(hf_folder: Path) -> str | None:
    """``gpt-2`` for a byte-level BPE tokenizer that splits like GPT-2 (codetune's trained tokenizers); the
    converter recognises released vocabularies by a hash of their tokens, which a freshly trained one lacks."""
    path = hf_folder / "tokenizer.json"
    if not path.is_file():
        return None
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    plain_gpt2 = (
        model.get("type") == "BPE"
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )
    return "gpt-2" if plain_gpt2 else None


def _rope_expectations(config: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...], list[str]]:
    """GGUF RoPE values (keys without the ``<arch>.rope.`` prefix), required tensors, and notes."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params = params.get("full_attention", params)  # layer-typed configs: the converter reads this entry
    theta = params.get("rope_theta", config.get("rope_theta"))
    kind = params.get("rope_type", params.get("type"))
    expect: dict[str, Any] = {}
    if theta is not None:
        expect["freq_base"] = float(theta)
    if kind in (None, "default"):
        return expect, (), []
    if kind == "linear":
        expect.update({"scaling.type": "linear", "scaling.factor": float(params["factor"])})
        return expect, (), []
    if kind == "yarn":
        expect.update(
            {
                "scaling.type": "yarn",
                "scaling.factor": float(params["factor"]),
                "scaling.original_context_length": int(params["original_max_position_embeddings"]),
            }
        )
        for name, key in (("beta_fast", "scaling.yarn_beta_fast"), ("beta_slow", "scaling.yarn_beta_slow")):
            if params.get(name) is not None:
                expect[key] = float(params[name])
        return expect, (), []
    if kind == "llama3":
        # The converter writes Llama 3.1's per-band factors as a tensor instead of metadata.
        return expect, ("rope_freqs.weight",), []
    return (
        expect,
        (),
        [
            f"RoPE type {kind!r} (config.json) has no GGUF equivalent in llama.cpp's converter: the file runs "
            "with plain RoPE at the same base, which matches the trained model only up to its original context"
        ],
    )


# ---- conversion -------------------------------------------------------------------------------------------


def _convert(
    llama: Path, hf_folder: Path, target: Path, outtype: str, name: str, expected: _Expected
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


# ---- reading back and checking -------------------------------------------------------------------------------


def check_gguf(
    path: str | Path, expected: _Expected | str | Path, sentinels: str | FIMSentinels | None = None
) -> dict[str, Any]:
    """Compare a GGUF file's metadata with its Hugging Face folder (or precomputed expectations); return the
    metadata, or raise :class:`GgufCheckError` listing every difference."""
    if not isinstance(expected, _Expected):
        folder = Path(expected)
        expected = expected_contents(folder, check_hf_folder(folder), sentinels)
    facts = read_gguf_metadata(path)
    problems = _differences(facts, expected)
    if problems:
        raise GgufCheckError(f"{path} does not match its Hugging Face folder: " + "; ".join(problems))
    return facts


def _differences(facts: dict[str, Any], expected: _Expected) -> list[str]:
    problems = []
    tokens: list[str] = facts.get(TOKENS_KEY) or []
    types: list[int] = facts.get(TOKEN_TYPE_KEY) or []
    if len(tokens) != expected.vocab_rows:
        problems.append(f"{len(tokens)} tokens, the model has {expected.vocab_rows} embedding rows")
    for token_id, text in expected.token_texts.items():
        if token_id >= len(tokens) or tokens[token_id] != text:
            found = tokens[token_id] if token_id < len(tokens) else None
            problems.append(f"token {token_id} is {found!r}, the tokenizer has {text!r}")
        elif types and types[token_id] not in (CONTROL, USER_DEFINED):
            problems.append(f"token {token_id} {text!r} is not a special token (type {types[token_id]})")
    wanted = {FIM_KEYS[r]: i for r, i in expected.token_ids.items() if r in FIM_KEYS}
    if "end" in expected.token_ids:
        wanted[EOT_KEY] = expected.token_ids["end"]
    if "eos" in expected.token_ids:
        wanted[EOS_KEY] = expected.token_ids["eos"]
    for key, value in wanted.items():
        if facts.get(key) != value:
            problems.append(f"{key} is {facts.get(key)}, expected {value}")
    for key, value in ((ADD_BOS_KEY, expected.add_bos), (ADD_EOS_KEY, expected.add_eos)):
        if bool(facts.get(key, False)) != value:
            problems.append(
                f"{key} is {facts.get(key)}, the tokenizer {'adds' if value else 'does not add'} it"
            )
    arch = facts.get(ARCHITECTURE_KEY)
    if expected.context_length is not None and facts.get(f"{arch}.context_length") != expected.context_length:
        problems.append(
            f"{arch}.context_length is {facts.get(f'{arch}.context_length')}, config.json says {expected.context_length}"
        )
    rope = _read_rope(facts)
    for key, value in expected.rope.items():
        found = rope.get(key)
        same = (
            found is not None and math.isclose(float(found), value, rel_tol=1e-6)
            if isinstance(value, float)
            else found == value
        )
        if not same:
            problems.append(f"{arch}.rope.{key} is {found}, config.json says {value}")
    if not any(k.startswith("scaling.") for k in expected.rope) and rope.get("scaling.type") not in (
        None,
        "none",
    ):
        problems.append(
            f"{arch}.rope.scaling.type is {rope['scaling.type']}, config.json has no RoPE scaling"
        )
    for tensor in expected.needs_tensors:
        if tensor not in facts[TENSORS]:
            problems.append(f"tensor {tensor} is missing")
    return problems


def _read_ids(facts: dict[str, Any]) -> dict[str, int]:
    keys = {**FIM_KEYS, "end": EOT_KEY, "eos": EOS_KEY, "bos": BOS_KEY}
    return {role: int(facts[key]) for role, key in keys.items() if facts.get(key) is not None}


def _read_rope(facts: dict[str, Any]) -> dict[str, Any]:
    prefix = f"{facts.get(ARCHITECTURE_KEY)}.rope."
    return {k[len(prefix) :]: v for k, v in facts.items() if k.startswith(prefix)}


def _adds_repository_tokens(facts: dict[str, Any]) -> bool:
    if facts.get(FIM_REP_KEY) is not None or facts.get(FIM_SEP_KEY) is not None:
        return True
    texts = set(_LLAMA_CPP_REPO_TEXTS + _LLAMA_CPP_FILE_SEP_TEXTS)
    return any(t in texts for t in facts.get(TOKENS_KEY) or [])


def _infill_endpoint_notes(facts: dict[str, Any], expected: _Expected) -> tuple[str, ...]:
    if expected.sentinels is None or not _adds_repository_tokens(facts):
        return ()
    return (
        "llama-server's /infill prepends repository tokens (`<repo>myproject` / `<file_sep>filename`) because the "
        "vocabulary has them; codetune's FIM training has no repository context, so send the PSM prompt to "
        "/completion instead (Continue's llama.cpp provider does)",
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
