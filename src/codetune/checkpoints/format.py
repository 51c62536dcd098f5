"""The checkpoint format, in both directions: what ``codetune fit`` writes into a Lightning checkpoint and reads back.

A codetune checkpoint is self-contained: Lightning's ``state_dict`` (the Hugging Face model under
:data:`MODULE_PREFIX`), the model spec as plain ``hyper_parameters`` (:data:`MODEL_HPARAM`) and the tokenizer's
files (:data:`TOKENIZER_KEY`), so it loads with ``torch.load(weights_only=True)`` and no code from the run. The
training module writes it with :func:`hyperparameters` and :func:`add_tokenizer`; everything else reads it with
:func:`read_checkpoint`, or only its tensor shapes with :func:`checkpoint_shapes`.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codetune.checkpoints.integrity import already_verified, mark_verified, verify_checksums
from codetune.checkpoints.locate import Location, locate
from codetune.errors import first_line
from codetune.lightning_private import load_distributed_checkpoint
from codetune.model.build import ModelSpec

MODULE_PREFIX = "model."
"""Prefix of the Hugging Face model's weights in the LightningModule's ``state_dict`` (``CausalLM.model``)."""
MODEL_HPARAM = "model"
"""``hyper_parameters`` key of the model spec (``dataclasses.asdict`` of :class:`ModelSpec`)."""
TOKENIZER_KEY = "codetune_tokenizer"
"""Checkpoint key of the tokenizer's saved files (name -> text, or bytes for binary files)."""
_BNB_4BIT_STATE = re.compile(
    r"^(?P<weight>.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$"
)
_BNB_8BIT_STATE = re.compile(r"^(?P<layer>.+)\.(SCB|weight_format)$")


# ---- writing ------------------------------------------------------------------------------------------------


def hyperparameters(spec: ModelSpec) -> dict[str, Any]:
    """The module's ``hyper_parameters``: plain types only, so the checkpoint loads with ``weights_only=True``."""
    return {MODEL_HPARAM: dataclasses.asdict(spec)}


def add_tokenizer(checkpoint: dict[str, Any], tokenizer: Any) -> None:
    """Store the run's tokenizer in a checkpoint being saved, so it alone is enough to export or evaluate."""
    checkpoint[TOKENIZER_KEY] = tokenizer_files(tokenizer)


def tokenizer_files(tokenizer) -> dict[str, str | bytes]:
    """The tokenizer's saved files (text, or bytes for e.g. a SentencePiece ``tokenizer.model``), so a
    checkpoint alone is enough to export or evaluate; both types load with ``weights_only=True``."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files: dict[str, str | bytes] = {}
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file():
                data = path.read_bytes()
                try:
                    files[path.name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    files[path.name] = data
        return files


# ---- reading ------------------------------------------------------------------------------------------------


@dataclass
class TrainedCheckpoint:
    """A codetune checkpoint read back: enough to rebuild the trained model without the run's command line."""

    location: Location
    spec: ModelSpec
    """The model spec the run trained (from ``hyper_parameters["model"]``)."""
    tokenizer: Any
    """The run's tokenizer, FIM sentinels included."""
    state_dict: dict[str, torch.Tensor]
    """The Hugging Face model's weights as trained (``CausalLM.model.*``, prefix removed)."""
    global_step: int | None = None


def read_checkpoint(path: str | Path | Location) -> TrainedCheckpoint:
    """Read a codetune checkpoint (file, sharded folder or run directory) without running any of its code."""
    location = path if isinstance(path, Location) else locate(path)
    if location.kind != "checkpoint":
        raise ValueError(f"{location.path} is an exported model folder, not a training checkpoint")
    raw = _load_raw(location.path)
    if not already_verified(location.path):
        verify_checksums(raw, location.path)
        mark_verified(location.path)
    hparams = raw.get("hyper_parameters") or {}
    if MODEL_HPARAM not in hparams or "state_dict" not in raw:
        raise ValueError(
            f"{location.path}: not a codetune checkpoint (no hyper_parameters['model'] or state_dict); "
            "it must come from `codetune fit`"
        )
    if TOKENIZER_KEY not in raw:
        raise ValueError(
            f"{location.path}: the checkpoint carries no tokenizer ({TOKENIZER_KEY}); it must come from "
            "`codetune fit` with a data module that builds the tokenizer"
        )
    state_dict = {
        key[len(MODULE_PREFIX) :]: value
        for key, value in raw["state_dict"].items()
        if key.startswith(MODULE_PREFIX)
    }
    if not state_dict:
        raise ValueError(f"{location.path}: the checkpoint's state_dict has no `{MODULE_PREFIX}*` weights")
    return TrainedCheckpoint(
        location=location,
        spec=spec_from_hparams(hparams[MODEL_HPARAM]),
        tokenizer=tokenizer_from_files(raw[TOKENIZER_KEY]),
        state_dict=state_dict,
        global_step=raw.get("global_step"),
    )


def _load_raw(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return load_distributed_checkpoint(path)
    try:
        try:
            # mmap: the weights stay on disk until used, so a 7B checkpoint is not read into memory twice.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip format
    except Exception as err:  # UnpicklingError, a truncated zip, ...: name the file, keep it to one line
        reason = first_line(err)
        raise ValueError(f"{path}: not a readable checkpoint ({reason})") from None


def spec_from_hparams(values: dict[str, Any]) -> ModelSpec:
    """Rebuild the :class:`ModelSpec` from its ``asdict`` form (ModelSpec turns nested dicts back into dataclasses)."""
    try:
        return ModelSpec(**values)
    except TypeError as err:
        raise ValueError(
            f"checkpoint's model spec does not fit this codetune version's ModelSpec: {err}"
        ) from None


def tokenizer_from_files(files: dict[str, str | bytes]):
    """A tokenizer from the text files ``CausalLM`` stores in its checkpoints."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            if Path(name).name != name:  # a file name, never a path out of the temp folder
                raise ValueError(f"checkpoint tokenizer file name {name!r} is not a plain file name")
            target = Path(tmp) / name
            if isinstance(text, bytes):
                target.write_bytes(text)
            else:
                target.write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)


def quantized_keys(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Keys of bitsandbytes-quantized weights and of the quantization state stored beside them.

    Recognised by that state (4-bit ``weight.absmax``/``weight.quant_state.*``, 8-bit ``SCB``) rather than by
    dtype alone, since FSDP-ready QLoRA stores its packed 4-bit weights in a float dtype.
    """
    found = set()
    for key, value in state_dict.items():
        four_bit, eight_bit = _BNB_4BIT_STATE.match(key), _BNB_8BIT_STATE.match(key)
        if four_bit:
            found |= {key, four_bit["weight"]}
        elif eight_bit:
            found |= {key, eight_bit["layer"] + ".weight"}
        elif not value.is_floating_point() and key.endswith(".weight"):
            found.add(key)
    return found


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Verify a checkpoint file's checksums (its tensors memory-mapped, so only what is summed is read) and return
    it; ``{}`` for a sharded folder (its shards are not summed, see :mod:`codetune.checkpoints.integrity`)."""
    path = Path(path)
    if path.is_dir():
        return {}
    raw = _load_raw(path)
    if not already_verified(path):
        verify_checksums(raw, path)
        mark_verified(path)
    return raw


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes a checkpoint holds (LightningModule keys, e.g. ``model.model.embed_tokens.weight``),
    read without loading the weights: a ``.ckpt`` file is memory-mapped, a sharded folder's index is read."""
    path = Path(path)
    reason = None
    try:
        if path.is_dir():
            from torch.distributed.checkpoint import FileSystemReader

            metadata = FileSystemReader(str(path)).read_metadata()
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # unpickling, zip and metadata errors alike: name the path, not the reader
        reason = first_line(err)
    if reason is not None:  # raised outside the handler, so the one-line report shows this message
        raise ValueError(f"--ckpt_path {path}: not a readable checkpoint ({reason})")
    if path.is_dir():
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        prefix = "state_dict."
        return {
            key[len(prefix) :]: tuple(item.size)
            for key, item in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
        }
    if not isinstance(raw, dict):
        raise ValueError(f"--ckpt_path {path}: not a Lightning checkpoint (it holds a {type(raw).__name__})")
    return {k: tuple(v.shape) for k, v in raw.get("state_dict", {}).items() if isinstance(v, torch.Tensor)}


def check_checkpoint_fits(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    where: str | Path,
    strict: bool = True,
) -> None:
    """Raise one clear ``ValueError`` when a checkpoint's tensors do not fit the model this recipe builds.

    Shapes must always agree; with ``strict`` (the module's ``strict_loading``) the names must too.
    """
    mismatched = [
        f"{k} is {tuple(found[k])} there, {tuple(v)} here"
        for k, v in expected.items()
        if k in found and tuple(found[k]) != tuple(v)
    ]
    missing = [k for k in expected if k not in found] if strict else []
    unexpected = [k for k in found if k not in expected] if strict else []
    if not (mismatched or missing or unexpected):
        return
    if mismatched:
        detail = f"{len(mismatched)} tensor shapes differ ({'; '.join(mismatched[:2])}{'; ...' if len(mismatched) > 2 else ''})"
    elif missing:
        detail = f"{len(missing)} weights of this model are not in it ({', '.join(missing[:2])}, ...)"
    else:
        detail = f"it has {len(unexpected)} weights this model lacks ({', '.join(unexpected[:2])}, ...)"
    raise ValueError(
        f"--ckpt_path {where} does not fit the model this recipe builds: {detail}; it was written by another "
        "recipe (model, adapter or tokenizer) — resume with the recipe that wrote it, or start without --ckpt_path"
    )
