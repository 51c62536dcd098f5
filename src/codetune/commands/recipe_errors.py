"""A recipe the parser rejects gets one line: the key, what is wrong with it, and the likely fix.

jsonargparse reports a bad value inside a ``class_path`` entry as a tree of union alternatives (40-60 lines under
a usage block); the line that matters is its deepest leaf. That leaf is turned into ``<key>: <problem>``, with a
did-you-mean for a misspelt option and the new home of a setting that moved (old recipes keep working or say
where to go).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MOVED_OPTIONS: dict[str, str] = {
    "sentinels": (
        "the FIM sentinel set is set once, on the tokenizer: data.init_args.tokenizer.sentinels (leave it unset to "
        "use the set a pretrained tokenizer carries); remove it here"
    ),
}
"""Options that moved: option name -> where it is set now."""
MOVED_CLASS_PATHS: dict[str, str] = {
    "codetune.model.sharding.FSDP2Strategy": "codetune.strategies.FSDP2Strategy",
}
"""Class paths that moved: old -> new."""

_SKIP = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
)
_KEY = re.compile(r'^Parser key "([^"]+)":?$')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':?$")
_NOT_ACCEPTED = re.compile(r"^(?:Option|Key) '([^']+)' is not accepted")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)$")
_NOT_ACCEPTED_KEY = re.compile(r"does not accept (?:option|key) '([^']+)'")


def condensed_parse_errors(message: str, known_options: Iterable[str] = ()) -> str:
    """One line for a jsonargparse error ``message``; ``known_options`` (``--trainer.max_steps`` ...) feed the
    did-you-mean of an unrecognized command-line option."""
    for old, new in MOVED_CLASS_PATHS.items():
        if old in message:
            return f"class_path {old} moved: write {new}"
    unrecognized = _UNRECOGNIZED.match(message.strip().splitlines()[0]) if message.strip() else None
    if unrecognized:
        return _unrecognized(unrecognized.group(1), known_options)
    not_accepted = _NOT_ACCEPTED_KEY.search(message)
    if not_accepted:  # a recipe key the parser does not know, e.g. trainer.max_stepz in the YAML
        return _unrecognized("--" + not_accepted.group(1), known_options, what="unknown recipe key")
    path, leaf = _deepest_leaf(message)
    key = ".".join(path)
    nested = _UNRECOGNIZED.match(leaf)
    if nested:  # an unknown key inside a class's init_args, e.g. --model.init_args.model.init_sed
        owner = _owner_class(message, path)
        known = [f"--{key}.{o}" for o in _dotted_options(owner)] if owner else []
        given = [f"--{key}.{a.removeprefix('--')}" for a in nested.group(1).split() if a.startswith("--")]
        return _unrecognized(" ".join(given) or nested.group(1), known)
    accepted = _NOT_ACCEPTED.match(leaf)
    if accepted:
        option = accepted.group(1)
        owner = _owner_class(message, path)
        full = f"{key}.{option}" if key else option
        if option in MOVED_OPTIONS:
            return f"{full}: moved — {MOVED_OPTIONS[option]}"
        close = difflib.get_close_matches(option, _options_of(owner), n=1) if owner else []
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{full}: {owner or 'this section'} has no option {option!r}{hint}"
    return f"{key}: {leaf}" if key else leaf


def check_moved_class_paths(config: Any) -> None:
    """Refuse, in one line, a parsed recipe that names a class by a path that moved (a strategy given as a string
    passes the parser and would fail later, inside Lightning)."""
    if isinstance(config, dict):
        values: Iterable[Any] = config.values()
    elif isinstance(config, list | tuple):
        values = config
    else:
        if isinstance(config, str) and config in MOVED_CLASS_PATHS:
            raise ValueError(f"class_path {config} moved: write {MOVED_CLASS_PATHS[config]}")
        return
    for value in values:
        check_moved_class_paths(value)


def _deepest_leaf(message: str) -> tuple[list[str], str]:
    """The key path (``model.init_args.model``) and text of the most deeply nested problem in the error tree."""
    stack: list[tuple[int, str | None]] = []
    best: tuple[int, list[str], str] | None = None
    for raw in message.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        line = raw.strip().removeprefix("- ").strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key, cls = _KEY.match(line), _CLASS.match(line)
        if key or cls:
            stack.append((indent, key.group(1) if key else None))
            continue
        if line.startswith(_SKIP):
            continue
        segments = [s if s is not None else "init_args" for _, s in stack]
        if best is None or len(segments) > best[0]:
            best = (len(segments), segments, line)
    if best is None:
        return [], message.strip().splitlines()[0] if message.strip() else "invalid recipe"
    return best[1], best[2]


def _owner_class(message: str, path: list[str]) -> str | None:
    """The innermost ``class_path`` the deepest problem belongs to."""
    found = re.findall(r"Problem with given class_path '([^']+)'", message)
    return found[-1] if found and path and path[-1] == "init_args" else None


def _options_of(class_path: str) -> list[str]:
    """The parameters a recipe may set for ``class_path`` (constructor arguments or dataclass fields)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return []
    return [p for p in parameters if p != "self" and parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]


def _dotted_options(class_path: str, depth: int = 3) -> list[str]:
    """Every key a recipe may set under ``class_path``'s ``init_args``, nested dataclass fields included
    (``model.adapter.r``)."""
    out = []
    for name, annotation in _options_with_types(class_path):
        out.append(name)
        for cls in _dataclasses_in(annotation) if depth > 1 else []:
            out += [
                f"{name}.{sub}" for sub in _dotted_options(f"{cls.__module__}.{cls.__qualname__}", depth - 1)
            ]
    return out


def _options_with_types(class_path: str) -> list[tuple[str, object]]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(cls if dataclasses.is_dataclass(cls) else cls.__init__)
    except Exception:  # an unimportable or unannotated class: no suggestions rather than a second error
        return [(o, None) for o in _options_of(class_path)]
    return [(o, hints.get(o)) for o in _options_of(class_path)]


def _dataclasses_in(annotation: object) -> list[type]:
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return [annotation]
    return [c for arg in typing.get_args(annotation) for c in _dataclasses_in(arg)]


def _unrecognized(arguments: str, known_options: Iterable[str], what: str = "unknown option") -> str:
    """``what`` and each ``--option`` of ``arguments`` with its likely spelling; recipe keys lose the dashes."""
    known = sorted(set(known_options))
    shown = (
        (lambda option: option) if what == "unknown option" else (lambda option: option.removeprefix("--"))
    )
    parts = []
    for option in [a for a in arguments.split() if a.startswith("--")] or [arguments]:
        name = option.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        parts.append(f"{shown(name)} (did you mean {shown(close[0])}?)" if close else shown(name))
    return f"{what} " + ", ".join(parts) + "; `codetune fit --help` lists the options"


MAX_SEQ_LEN = 1 << 20
"""Longest row a recipe may ask for (a million tokens; the longest-context code models train at 100k)."""
MAX_BATCH_SIZE = 4096
"""Most rows per device per step; larger effective batches come from ``trainer.accumulate_grad_batches``."""


def check_recipe_values(config: dict[str, Any], memory_bytes: int | None = None) -> list[str]:
    """Refuse, in one line and before anything is built, recipe numbers that cannot train: a non-positive size,
    step count or learning rate, a row or batch no machine holds, a model that does not fit ``memory_bytes``, an
    output folder that is a file. Returns warnings for values that train but likely not as meant."""
    warnings: list[str] = []
    trainer = config.get("trainer") or {}
    data = _init_args(config.get("data"))
    model = _init_args(config.get("model"))
    spec = model.get("model") or {}
    root = trainer.get("default_root_dir")
    if root and Path(str(root)).expanduser().exists() and not Path(str(root)).expanduser().is_dir():
        raise ValueError(
            f"trainer.default_root_dir: {root} is a file, not a folder; give a folder for the runs"
        )
    max_steps = trainer.get("max_steps")
    if isinstance(max_steps, int) and max_steps < -1:
        raise ValueError(f"trainer.max_steps: {max_steps}; give a positive number of steps (or -1: no limit)")
    seq_len, batch_size = data.get("seq_len"), data.get("batch_size")
    if isinstance(seq_len, int) and not 2 <= seq_len <= MAX_SEQ_LEN:
        raise ValueError(f"data.seq_len: {seq_len}; rows need 2 to {MAX_SEQ_LEN:,} tokens")
    if isinstance(batch_size, int) and not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(
            f"data.batch_size: {batch_size} rows per device; give 1 to {MAX_BATCH_SIZE} and raise "
            "trainer.accumulate_grad_batches for a larger effective batch"
        )
    train = _init_args((data.get("tokenizer") or {}).get("train"))
    vocab = train.get("vocab_size")
    if isinstance(vocab, int) and vocab <= 256:
        raise ValueError(
            f"data.tokenizer.train.vocab_size: {vocab}; a byte-level BPE needs more than its 256 byte tokens "
            "(e.g. 4096)"
        )
    optimizer = _init_args(model.get("optimizer"))
    lr = optimizer.get("lr")
    if isinstance(lr, int | float) and not isinstance(lr, bool) and not lr > 0:
        raise ValueError(f"model.optimizer.lr: {lr}; the learning rate must be positive (e.g. 3e-4)")
    for key, value in _init_args(model.get("scheduler")).items():
        if key.endswith("steps") and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"model.scheduler.{key}: {value}; a number of steps cannot be negative")
    shape = spec.get("config") if isinstance(spec, dict) else None
    adapter = spec.get("adapter") if isinstance(spec, dict) else None
    full = not isinstance(adapter, dict) or adapter.get("method", "full") == "full"
    if isinstance(shape, dict):
        warnings += _check_model_shape(shape, seq_len, memory_bytes if full else None)
    return warnings


def _check_model_shape(shape: dict[str, Any], seq_len: Any, memory_bytes: int | None) -> list[str]:
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = shape.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"model.config.{key}: {value}; it must be a positive whole number")
    hidden, heads = shape.get("hidden_size"), shape.get("num_attention_heads")
    if hidden and heads and hidden % heads:
        raise ValueError(
            f"model.config.hidden_size: {hidden} is not a multiple of num_attention_heads ({heads})"
        )
    layers, inner = shape.get("num_hidden_layers") or 1, shape.get("intermediate_size") or 4 * (hidden or 0)
    vocab = shape.get("vocab_size") or 32000
    if hidden and memory_bytes:
        # attention (4 h^2) + MLP (3 h i) per layer, embeddings and head; 16 bytes per weight to train it with
        # AdamW in fp32 (weight, gradient, two moments), activations not counted: a floor, not an estimate.
        params = layers * (4 * hidden * hidden + 3 * hidden * inner) + 2 * vocab * hidden
        if params * 16 > memory_bytes:
            raise ValueError(
                f"model.config: hidden_size {hidden} x {layers} layers is about {params / 1e9:.1f}B parameters, "
                f"at least {params * 16 / 2**30:,.0f} GiB to train in fp32 with AdamW; this machine has "
                f"{memory_bytes / 2**30:,.0f} GiB: make the model smaller"
            )
    positions = shape.get("max_position_embeddings")
    if isinstance(seq_len, int) and isinstance(positions, int) and seq_len > positions:
        return [
            f"data.seq_len {seq_len} is above the model's max_position_embeddings {positions}: positions past "
            f"{positions} were never trained (raise max_position_embeddings, or rescale RoPE with model.rope)"
        ]
    return []


def _init_args(value: Any) -> dict[str, Any]:
    """The settings of a recipe section, whether written with ``class_path``/``init_args`` or directly."""
    if not isinstance(value, dict):
        return {}
    init = value.get("init_args")
    return init if isinstance(init, dict) else value
