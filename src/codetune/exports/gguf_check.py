"""What the GGUF file of a Hugging Face model folder must carry, and the check of a written file against it.

Read from the folder before converting (:func:`expected_contents`): the FIM sentinel set and its token ids and
texts, EOS and the end of an infill, whether the tokenizer prepends BOS, the vocabulary size, the context length
and the RoPE base and scaling (transformers' ``rope_parameters``). The same expectations give the tokenizer keys
the exporter writes (``keys``) and, after writing, the comparison (:func:`check_gguf`) of the file's metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codetune.data.tokenizer import (
    SENTINEL_SETS,
    FIMSentinels,
    carried_sentinel_sets,
    newest_carried_set,
    resolve_sentinels,
)
from codetune.exports.gguf_metadata import (
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

# Token texts llama.cpp (this pinned version, src/llama-vocab.cpp) takes as FIM_REP / FIM_SEP when no key names
# them; llama-server's /infill then prepends `<rep>myproject\n<sep>filename\n` to every prompt.
_LLAMA_CPP_REPO_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_LLAMA_CPP_FILE_SEP_TEXTS = ("<|file_sep|>",)


class GgufCheckError(ValueError):
    """A GGUF file does not carry what its Hugging Face folder says (FIM tokens, EOS, RoPE, ...)."""


@dataclass(frozen=True)
class GgufExpectations:
    """What the GGUF of a Hugging Face folder must carry, read from the folder before converting."""

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


def expected_contents(
    hf_folder: Path, config: dict[str, Any], sentinels: str | FIMSentinels | None = None
) -> GgufExpectations:
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
    return GgufExpectations(
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
    chosen = newest_carried_set(vocab)
    if chosen is None:
        return None, None
    return chosen, next(n for n, s in SENTINEL_SETS.items() if s == chosen)


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


# ---- checking a written file -------------------------------------------------------------------------------


def check_gguf(
    path: str | Path, expected: GgufExpectations | str | Path, sentinels: str | FIMSentinels | None = None
) -> dict[str, Any]:
    """Compare a GGUF file's metadata with its Hugging Face folder (or precomputed expectations); return the
    metadata, or raise :class:`GgufCheckError` listing every difference."""
    if not isinstance(expected, GgufExpectations):
        folder = Path(expected)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        expected = expected_contents(folder, config, sentinels)
    facts = read_gguf_metadata(path)
    problems = _differences(facts, expected)
    if problems:
        raise GgufCheckError(f"{path} does not match its Hugging Face folder: " + "; ".join(problems))
    return facts


def _differences(facts: dict[str, Any], expected: GgufExpectations) -> list[str]:
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
    if expected.add_bos:  # only then does llama.cpp put the BOS id in a prompt
        wanted[BOS_KEY] = expected.token_ids["bos"]
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
    rope = read_rope(facts)
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


def read_ids(facts: dict[str, Any]) -> dict[str, int]:
    """The FIM, end-of-infill, EOS and BOS token ids a GGUF names (``prefix``, ..., ``end``, ``eos``, ``bos``)."""
    keys = {**FIM_KEYS, "end": EOT_KEY, "eos": EOS_KEY, "bos": BOS_KEY}
    return {role: int(facts[key]) for role, key in keys.items() if facts.get(key) is not None}


def read_rope(facts: dict[str, Any]) -> dict[str, Any]:
    """The RoPE keys of a GGUF without their ``<arch>.rope.`` prefix (``freq_base``, ``scaling.type``, ...)."""
    prefix = f"{facts.get(ARCHITECTURE_KEY)}.rope."
    return {k[len(prefix) :]: v for k, v in facts.items() if k.startswith(prefix)}


def adds_repository_tokens(facts: dict[str, Any]) -> bool:
    """Whether llama-server's ``/infill`` puts repository/file tokens in front of every prompt for this file."""
    if facts.get(FIM_REP_KEY) is not None or facts.get(FIM_SEP_KEY) is not None:
        return True
    texts = set(_LLAMA_CPP_REPO_TEXTS + _LLAMA_CPP_FILE_SEP_TEXTS)
    return any(t in texts for t in facts.get(TOKENS_KEY) or [])


def infill_endpoint_notes(facts: dict[str, Any], expected: GgufExpectations) -> tuple[str, ...]:
    """A note for the card when ``/infill`` would not send the trained prompt."""
    if expected.sentinels is None or not adds_repository_tokens(facts):
        return ()
    return (
        "llama-server's /infill prepends repository tokens (`<repo>myproject` / `<file_sep>filename`) because the "
        "vocabulary has them; codetune's FIM training has no repository context, so send the PSM prompt to "
        "/completion instead (Continue's llama.cpp provider does)",
    )
