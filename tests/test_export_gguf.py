"""GGUF export: a trained FIM model infills in real llama.cpp exactly as in transformers; the editor templates
render, under each runtime's own rules, exactly the prompt the model was trained on; bad input fails first.

Oracles: llama.cpp itself (node-llama-cpp's prebuilt binaries, ``tests/llama_cpp_runtime.py``), Go's
text/template with Ollama's rules and Handlebars (``tests/template_oracles.py``), and codetune's training
layout (``format_infill_prompt`` / ``FIMTransform.encode_infill_prompt``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from codetune.data.fim import FIMConfig, FIMSplit, FIMTransform, format_infill_prompt
from codetune.data.tokenizer import SENTINEL_SETS, FIMSentinels, TokenizerSpec, build_tokenizer
from codetune.exports import editors
from codetune.exports.gguf import GgufExport, check_gguf_options, export_gguf
from codetune.exports.gguf_check import GgufCheckError, check_gguf
from codetune.exports.gguf_metadata import FIM_KEYS, read_gguf_metadata
from codetune.model.rope import RopeScaling, apply_rope_scaling
from tests.llama_cpp_runtime import run_llama_cpp
from tests.template_oracles import render_handlebars, render_ollama
from tests.vocabularies import vocabulary

DECODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
# (prefix, suffix, middle): what the tiny model memorises, in PSM, so that greedy infilling is far from any tie.
TRAINED = [
    ("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n", "return a + b"),
    ("class Stack:\n    def push(self, x):\n        ", "\n", "self.items.append(x)"),
]
# Special tokens, a literal sentinel-looking string that is not one, whitespace runs, accents and an emoji.
SNIPPET = (
    "<fim_prefix>def f(x):\n\t\treturn x  # <fim_suffix\n<fim_suffix>\n\n    café 🦙 <|endoftext|>"
    "<fim_middle>x<fim_pad>  \n"
)


@contextmanager
def one_thread():
    """Tiny models train several times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_to_memorise(model, fim: FIMTransform, docs, steps: int = 40, lr: float = 1e-2) -> float:
    """AdamW on the middles (and end sentinel) of ``docs`` laid out in PSM; returns the final loss."""
    encoded = [fim.encode_split(FIMSplit(prefix=p, middle=m, suffix=s, mode="psm")) for p, s, m in docs]
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for row, e in enumerate(encoded):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        for col, is_middle in enumerate(e.middle_mask):
            if is_middle:
                labels[row, col] = e.input_ids[col]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    with one_thread():
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return loss.item()


def greedy_middle(
    folder: Path, prefix: str, suffix: str, max_new_tokens: int = 24
) -> tuple[list[int], float]:
    """transformers' greedy infill on the exported HF folder: the middle's ids (up to the end sentinel) and the
    smallest top-1/top-2 logit gap along the way."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fim = FIMTransform(FIMConfig(), tokenizer, "starcoder")
    ids = fim.encode_infill_prompt(prefix, suffix)
    middle, margin = [], float("inf")
    with torch.no_grad(), one_thread():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + middle])).logits[0, -1]
            top = logits.topk(2)
            margin = min(margin, (top.values[0] - top.values[1]).item())
            token = int(top.indices[0])
            if token == fim.end_id:
                break
            middle.append(token)
    return middle, margin


@dataclass
class Exported:
    hf: Path
    export: GgufExport
    tokenizer: object
    loss: float
    train_seconds: float
    convert_cpu: float
    """CPU seconds of the converter subprocess."""


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def starcoder_run(tmp_path_factory) -> Exported:
    """A tiny StarCoder2 on the real StarCoder2 vocabulary, long-context (YaRN ×4 over 256 positions), trained to
    memorise two infills, exported as an HF folder and converted to f16 GGUF."""
    tokenizer = build_tokenizer(
        TokenizerSpec(name_or_path=str(vocabulary("starcoder")), sentinels="starcoder")
    )
    config = AutoConfig.for_model(
        "starcoder2",
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=False,  # an untied head memorises in 40 steps; tied needs about twice as many
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **DECODER,
    )
    apply_rope_scaling(config, RopeScaling(type="yarn", factor=4.0))
    started = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        # 80 steps at 5e-3: the greedy gaps come out near 6 (40 at 1e-2 left one at 0.3 on the 49,152-row vocabulary).
        fim = FIMTransform(FIMConfig(), tokenizer, "starcoder")
        loss = train_to_memorise(model, fim, TRAINED, steps=80, lr=5e-3)
    train_seconds = time.perf_counter() - started
    hf = tmp_path_factory.mktemp("starcoder2-fim")
    model.eval().save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    cpu = children_cpu_seconds()
    export = export_gguf(hf, hf.parent / "gguf" / "tiny-fim.f16.gguf", outtype="f16", name="tiny-fim")
    return Exported(hf, export, tokenizer, loss, train_seconds, convert_cpu=children_cpu_seconds() - cpu)


def llama_cpp_disagreements(gguf: Path, hf: Path) -> list[str]:
    """What llama.cpp does differently from transformers on ``hf``'s model: FIM tokens it does not find, texts it
    tokenizes otherwise, infills it completes otherwise. Empty: llama.cpp serves this model as trained."""
    tokenizer = AutoTokenizer.from_pretrained(hf)
    fim = FIMTransform(FIMConfig(), tokenizer, "starcoder")
    prompts = [format_infill_prompt(p, s, "psm", "starcoder") for p, s, _ in TRAINED]
    answer = run_llama_cpp(
        gguf,
        tokenize=[SNIPPET, *prompts],
        infill=[{"prefix": p, "suffix": s, "maxTokens": 24} for p, s, _ in TRAINED],
    )
    problems = []
    found = answer["tokens"]
    wanted = {"prefix": fim.prefix_id, "suffix": fim.suffix_id, "middle": fim.middle_id}
    if not answer["infillSupported"] or any(found[k] != v for k, v in wanted.items()):
        problems.append(f"llama.cpp's FIM tokens {found} are not the trained {wanted}")
    if found["prependsBos"] != (tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]):
        problems.append("llama.cpp's BOS rule differs from the tokenizer's")
    if answer["tokenize"][0] != tokenizer.encode(SNIPPET, add_special_tokens=False):
        problems.append("the FIM snippet tokenizes differently")
    for (p, s, _), ids in zip(TRAINED, answer["tokenize"][1:], strict=True):
        if ids != fim.encode_infill_prompt(p, s):
            problems.append(f"the rendered PSM prompt for {p!r} tokenizes differently from training")
    if not answer["infill"]:
        return [*problems, "llama.cpp ran no infill"]
    for (p, s, _), got in zip(TRAINED, answer["infill"], strict=True):
        middle, _ = greedy_middle(hf, p, s)
        if got["ids"] != middle:
            problems.append(f"infill of {p!r}: llama.cpp {got['ids']} != transformers {middle}")
    return problems


# ---- llama.cpp end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_infills_and_tokenizes_like_transformers(starcoder_run):
    # Exact token equality of every greedy middle (f16 weights in llama.cpp, fp32 in transformers): it holds
    # because training leaves the greedy choice far from a tie (gap asserted below), well above f16's rounding.
    for prefix, suffix, middle in TRAINED:
        ids, margin = greedy_middle(starcoder_run.hf, prefix, suffix)
        assert starcoder_run.tokenizer.decode(ids) == middle
        assert margin > 1.0, f"near-tie (gap {margin:.3f}): f16 could flip it; train longer"
        print(f"\nsmallest top-1/top-2 logit gap on the greedy path of {prefix!r}: {margin:.2f}")
    started, cpu = time.perf_counter(), children_cpu_seconds()
    assert llama_cpp_disagreements(starcoder_run.export.path, starcoder_run.hf) == []
    print(
        f"\ntrain {starcoder_run.train_seconds:.1f} s (loss {starcoder_run.loss:.3f}); convert "
        f"{starcoder_run.export.seconds:.1f} s wall, {starcoder_run.convert_cpu:.1f} s CPU; llama.cpp check "
        f"{time.perf_counter() - started:.1f} s wall (node {children_cpu_seconds() - cpu:.1f} s CPU)"
    )


@pytest.mark.slow
def test_a_gguf_without_its_fim_tokens_fails_the_checks(starcoder_run, tmp_path):
    broken = tmp_path / "broken.gguf"
    break_fim_tokens(starcoder_run.export.path, broken)
    with pytest.raises(GgufCheckError, match="fim_pre_token_id is None, expected 1"):
        check_gguf(broken, starcoder_run.hf)
    problems = llama_cpp_disagreements(broken, starcoder_run.hf)
    assert any("FIM tokens" in p for p in problems)
    assert any("snippet tokenizes differently" in p for p in problems)


@pytest.mark.slow
def test_gguf_metadata_carries_the_fim_set_eos_and_long_context_rope(starcoder_run):
    export = starcoder_run.export
    facts = read_gguf_metadata(export.path)
    tokens = facts["tokenizer.ggml.tokens"]
    assert [tokens[i] for i in (1, 3, 2, 4)] == ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>"]
    assert [facts[FIM_KEYS[r]] for r in ("prefix", "suffix", "middle", "pad")] == [1, 3, 2, 4]
    assert facts["tokenizer.ggml.eot_token_id"] == facts["tokenizer.ggml.eos_token_id"] == 0  # <|endoftext|>
    assert facts["tokenizer.ggml.add_bos_token"] is False
    assert facts["starcoder2.context_length"] == 1024
    config = json.loads((starcoder_run.hf / "config.json").read_text())["rope_parameters"]
    assert export.rope == {
        "freq_base": pytest.approx(config["rope_theta"]),
        "scaling.type": "yarn",
        "scaling.factor": 4.0,
        "scaling.original_context_length": 256,
    }
    assert (export.sentinel_set, export.gguf_architecture, export.infill_endpoint) == (
        "starcoder",
        "starcoder2",
        True,
    )


@pytest.mark.slow
def test_a_codetune_trained_tokenizer_with_code_llama_sentinels_converts(tokenizer, tiny_llama, tmp_path):
    # A BPE tokenizer trained by codetune is unknown to the converter's vocabulary hashes: it is declared gpt-2.
    config = AutoConfig.for_model(tiny_llama.pop("model_type"), vocab_size=len(tokenizer), **tiny_llama)
    apply_rope_scaling(config, RopeScaling(type="theta", theta=1_000_000.0))  # Code Llama's long-context θ
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    export = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", outtype="q8_0")
    facts = read_gguf_metadata(export.path)
    ids = tokenizer.convert_tokens_to_ids(["<PRE>", "<SUF>", "<MID>", "<EOT>"])
    assert [facts[FIM_KEYS[r]] for r in ("prefix", "suffix", "middle")] + [
        facts["tokenizer.ggml.eot_token_id"]
    ] == ids
    assert facts["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id != ids[3]
    assert facts["tokenizer.ggml.pre"] == "gpt-2"
    assert export.rope["freq_base"] == pytest.approx(1e6)
    assert facts == gguf_package_metadata(export.path)  # the fast reader against the gguf package's reader
    code = "<PRE>def f(x):\n    <SUF>\n    return x * 2\n<MID>  é\t\t 12345 'll\n"
    answer = run_llama_cpp(export.path, tokenize=[code])
    assert answer["tokenize"][0] == tokenizer.encode(code, add_special_tokens=False)
    assert [answer["tokens"][k] for k in ("prefix", "suffix", "middle", "eot")] == ids


@pytest.mark.slow
def test_a_tokenizer_without_sentinels_exports_and_says_infill_is_unavailable(tmp_path, monkeypatch):
    plain = plain_bpe_tokenizer()
    config = AutoConfig.for_model(
        "starcoder2",
        vocab_size=len(plain),
        max_position_embeddings=128,
        bos_token_id=plain.eos_token_id,
        eos_token_id=plain.eos_token_id,
        **DECODER,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    plain.save_pretrained(tmp_path / "hf")
    # A K-quant goes through llama-quantize; a stand-in that copies the f16 file records how it is called.
    calls = tmp_path / "calls.json"
    fake = tmp_path / "bin" / "llama-quantize"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\nimport json, shutil, sys\nshutil.copy(sys.argv[1], sys.argv[2])\n"
        f"open({str(calls)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    export = export_gguf(tmp_path / "hf", tmp_path / "plain.gguf", outtype="q4_k_m")
    source, target, kind = json.loads(calls.read_text())
    assert kind == "Q4_K_M" and source.endswith("unquantized.gguf") and target.endswith(".q4_k_m.gguf")
    assert export.outtype == "q4_k_m" and export.path.is_file() and not Path(source).exists()
    assert export.sentinels is None and not any(
        k in read_gguf_metadata(export.path) for k in FIM_KEYS.values()
    )
    assert "infilling is unavailable" in export.notes[-1]
    section = editors.editor_section(export)
    assert "Infilling is unavailable" in section and "TEMPLATE" not in section
    assert 'TEMPLATE """{{ .Prompt }}"""' in editors.modelfile(export, "./plain.gguf")
    assert editors.tabby_json(export) == {}


def plain_bpe_tokenizer():
    """A 300-token byte-level BPE without FIM sentinels, trained in a moment on a few lines of code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([p + m + s for p, s, m in TRAINED] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


# ---- bad input, before any conversion -----------------------------------------------------------------------


@pytest.fixture
def no_conversion(monkeypatch):
    """Fail the test if the converter is reached: every refusal below must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the converter ran")

    monkeypatch.setattr("codetune.exports.gguf._convert", refuse)


def fake_hf_folder(folder: Path, architecture: str = "Starcoder2ForCausalLM") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "x"}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_unsupported_architecture_is_one_line_naming_it_and_the_supported_ones(tmp_path, no_conversion):
    vocabulary("starcoder")  # llama.cpp's files, or a skip
    with pytest.raises(ValueError) as err:
        export_gguf(fake_hf_folder(tmp_path / "hf", "FooBarForCausalLM"), tmp_path / "m.gguf")
    message = str(err.value)
    assert "\n" not in message and "FooBarForCausalLM" in message
    assert (
        "Starcoder2ForCausalLM" in message and "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message
    )
    # The same line from the check an export command makes before loading any weights.
    with pytest.raises(ValueError, match="architecture FooBarForCausalLM"):
        check_gguf_options("f16", "FooBarForCausalLM")
    check_gguf_options("q8_0", "Starcoder2ForCausalLM")


def test_adapter_only_folder_asks_for_the_merged_export(tmp_path, no_conversion):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="adapter-only folder .* export the merged model first"):
        export_gguf(folder, tmp_path / "m.gguf")


def test_k_quant_without_llama_quantize_says_how_to_get_it(tmp_path, monkeypatch, no_conversion):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="needs llama.cpp's `llama-quantize` on PATH") as err:
        export_gguf(fake_hf_folder(tmp_path / "hf"), tmp_path / "m.gguf", outtype="q4_k_m")
    assert "q8_0" in str(err.value) and "releases" in str(err.value)


def test_a_sentencepiece_vocabulary_without_sentencepiece_names_the_extra(
    tmp_path, monkeypatch, no_conversion
):
    folder = fake_hf_folder(tmp_path / "hf", "LlamaForCausalLM")
    (folder / "tokenizer.model").write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "sentencepiece" else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"codetune\[gguf\]"):
        export_gguf(folder, tmp_path / "m.gguf")


@pytest.mark.parametrize(
    ("outtype", "out", "error"),
    [("q4_x", "m.gguf", "outtype 'q4_x' is unknown"), ("f16", "m.bin", "ending in .gguf")],
)
def test_unknown_outtype_or_file_name_is_refused(tmp_path, no_conversion, outtype, out, error):
    with pytest.raises(ValueError, match=error):
        export_gguf(fake_hf_folder(tmp_path / "hf"), tmp_path / out, outtype=outtype)


def test_an_existing_gguf_is_kept_without_overwrite(tmp_path, no_conversion):
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gguf(fake_hf_folder(tmp_path / "hf"), tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"old"


@pytest.mark.parametrize(
    ("parameters", "expected", "tensors", "noted"),
    [
        ({"rope_type": "default", "rope_theta": 1e6}, {"freq_base": 1e6}, (), False),
        (
            {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
            {"freq_base": 1e4, "scaling.type": "linear", "scaling.factor": 4.0},
            (),
            False,
        ),
        (
            {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
            {"freq_base": 5e5},
            ("rope_freqs.weight",),
            False,
        ),
        ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, {"freq_base": 1e4}, (), True),
    ],
)
def test_rope_expectations_follow_the_converter(parameters, expected, tensors, noted):
    from codetune.exports.gguf_check import _rope_expectations

    rope, needs, notes = _rope_expectations({"rope_parameters": parameters, "max_position_embeddings": 4096})
    assert (rope, needs, bool(notes)) == (expected, tensors, noted)


# ---- editor templates under their runtimes' rules ----------------------------------------------------------

CASES = [
    ("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"),
    ("    x = {'a': 1}  # {{ .Prompt }} stays text\n", "\tyield x\n"),  # template syntax inside the code
    ("s = 'café 🦙'\n", "\n"),  # Continue never sends an empty suffix: it sends "\n"
]


@pytest.mark.parametrize("name", sorted(SENTINEL_SETS))
def test_ollama_template_renders_the_training_prompt(name):
    sentinels = SENTINEL_SETS[name]
    template = editors.ollama_template(sentinels)
    assert ".Suffix" in template  # what makes Ollama accept a suffix and Continue use Ollama's FIM
    rendered = render_ollama(template, [*CASES, ("def f():", ""), ("", "x = 1\n")])
    assert rendered[: len(CASES)] == [format_infill_prompt(p, s, "psm", sentinels) for p, s in CASES]
    # Without a suffix (or without a prefix) Ollama does not pass .Suffix: the model continues the prompt.
    assert rendered[len(CASES) :] == ["def f():", ""]


@pytest.mark.parametrize("name", sorted(SENTINEL_SETS))
def test_continue_template_renders_the_training_prompt_with_handlebars(name):
    sentinels = SENTINEL_SETS[name]
    for prefix, suffix in CASES:
        rendered = render_handlebars(
            editors.continue_template(sentinels), {"prefix": prefix, "suffix": suffix}
        )
        assert rendered == format_infill_prompt(prefix, suffix, "psm", sentinels)


@pytest.mark.parametrize("name", sorted(SENTINEL_SETS))
def test_tabby_template_renders_the_training_prompt(name):
    sentinels = SENTINEL_SETS[name]
    template = editors.tabby_prompt_template(sentinels)
    for prefix, suffix in CASES:
        # Tabby's rule: each `{prefix}` / `{suffix}` placeholder replaced once, in one pass.
        values = {"prefix": prefix, "suffix": suffix}
        rendered = re.sub(r"\{(prefix|suffix)\}", lambda m, v=values: v[m.group(1)], template)
        assert rendered == format_infill_prompt(prefix, suffix, "psm", sentinels)


def export_of(sentinels: FIMSentinels | None, path: Path, name: str = "tiny-fim") -> GgufExport:
    """A GgufExport as export_gguf returns it, for the file-writing tests (no conversion)."""
    return GgufExport(
        path=path, outtype="f16", name=name, architecture="Starcoder2ForCausalLM", gguf_architecture="starcoder2",
        sentinels=sentinels, sentinel_set=None, token_ids={}, eos_token="<|endoftext|>", add_bos=False,
        context_length=4096, rope={}, size_bytes=3, seconds=0.0, infill_endpoint=True,
    )  # fmt: skip


def test_editor_files_point_at_the_gguf_and_carry_the_template(tmp_path):
    gguf = tmp_path / "gguf" / "tiny-fim.f16.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    files = editors.write_editor_files(export_of(SENTINEL_SETS["starcoder"], gguf), tmp_path / "out")
    text = files.modelfile.read_text()
    source = re.search(r"^FROM (.+)$", text, re.M).group(1)
    assert (files.modelfile.parent / source).resolve() == gguf.resolve()
    assert 'PARAMETER stop "<|endoftext|>"' in text and "{{ if .Suffix }}<fim_prefix>" in text
    assert (files.tabby / "ggml" / "model-00001-of-00001.gguf").read_bytes() == b"GGUF"
    tabby = json.loads((files.tabby / "tabby.json").read_text())
    assert tabby == {"prompt_template": "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"}
    assert (
        "ollama create tiny-fim -f Modelfile" in files.section
        and "llama-server -m tiny-fim.f16.gguf" in files.section
    )
    bare = editors.write_editor_files(
        export_of(SENTINEL_SETS["starcoder"], gguf), tmp_path / "bare", tabby_weights=False
    )
    assert (bare.tabby / "tabby.json").is_file() and not (bare.tabby / "ggml").exists()


def test_a_name_continue_would_misread_is_called_out_with_the_fix(tmp_path):
    code_llama = export_of(SENTINEL_SETS["codellama"], tmp_path / "m.gguf", name="my-starcoder-tune")
    section = editors.editor_section(code_llama)
    assert "`my-starcoder-tune` gets the starcoder layout" in section
    assert "promptTemplates.autocomplete" in section and "no model name makes Continue" in section
    # A StarCoder-sentinel model under a neutral name: Continue's default template is the trained layout.
    assert editors.name_warnings("tiny-fim", SENTINEL_SETS["starcoder"]) == []
    # ... but not under a Qwen-Coder name, which Continue gives `<|fim_prefix|>`: renaming fixes it.
    (warning,) = editors.name_warnings("qwen-coder-ft", SENTINEL_SETS["starcoder"])
    assert "containing `starcoder`" in warning
    assert any("`//`" in w for w in editors.name_warnings("deepseek-tune", SENTINEL_SETS["starcoder"]))


# ---- helpers ----------------------------------------------------------------------------------------------


def gguf_package_metadata(path: Path) -> dict:
    """The same dictionary as read_gguf_metadata, read with the gguf package's GGUFReader (slow on big vocabularies)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    facts = {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    return {**facts, "tensors": [t.name for t in reader.tensors]}


def break_fim_tokens(source: Path, target: Path) -> None:
    """Copy a GGUF file with its FIM keys and sentinel texts respelt (`fim` -> `xim`), the lengths kept: the
    keys become unknown ones and llama.cpp's detection by text cannot find the sentinels either."""
    data = source.read_bytes()
    for old in [
        b"<fim_prefix>",
        b"<fim_suffix>",
        b"<fim_middle>",
        b"<fim_pad>",
        *map(str.encode, FIM_KEYS.values()),
    ]:
        assert data.count(old) == 1, old
        data = data.replace(old, old.replace(b"fim", b"xim"))
    target.write_bytes(data)
