"""Find and load what a user points at: a training checkpoint, a run directory, or an exported model folder.

A codetune checkpoint is self-contained: Lightning's ``state_dict``, the model spec as plain
``hyper_parameters`` and the tokenizer's files (``codetune_tokenizer``), so it loads with
``torch.load(weights_only=True)`` and no code from the run. :func:`load_for_inference` is the one seam every
consumer (``codetune eval``, ``codetune export``, notebooks) loads models through.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from codetune.model.build import ModelSpec

log = logging.getLogger(__name__)

MODULE_PREFIX = "model."
"""Prefix of the Hugging Face model's weights in the LightningModule's ``state_dict`` (``CausalLM.model``)."""
LAST_CHECKPOINT = "last.ckpt"
_DISTRIBUTED_METADATA = (
    ".metadata"  # torch.distributed.checkpoint's index; Lightning writes meta.pt beside it
)
_VERSION = re.compile(r"^version_(\d+)$")
_BNB_4BIT_STATE = re.compile(
    r"^(?P<weight>.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$"
)
_BNB_8BIT_STATE = re.compile(r"^(?P<layer>.+)\.(SCB|weight_format)$")


@dataclass(frozen=True)
class Location:
    """What a user-given path turned out to be."""

    kind: Literal["checkpoint", "hf_folder", "adapter_folder"]
    """``checkpoint``: a Lightning checkpoint (file, or a sharded folder); ``hf_folder``: an exported model;
    ``adapter_folder``: a PEFT adapter written by ``codetune export --adapter_only``."""
    path: Path
    """The checkpoint file/folder or the model folder itself."""
    run_dir: Path | None = None
    """The run's log directory (``config.yaml``, ``metrics.csv``, ``eval/``) when the checkpoint sits in one."""


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


def locate(path: str | Path) -> Location:
    """Resolve ``path`` to a checkpoint or an exported folder.

    Accepts a ``.ckpt`` file, a run directory (``runs/x``, ``runs/x/lightning_logs``,
    ``runs/x/lightning_logs/version_N`` → its ``checkpoints/last.ckpt``; the highest version when several
    exist), a ``checkpoints/`` folder, a sharded (FSDP2) checkpoint folder, or an exported Hugging Face folder.
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint, run directory or model folder")
    if given.is_file():
        return Location("checkpoint", given, _run_dir_of(given))
    if (given / "adapter_config.json").is_file():
        return Location("adapter_folder", given)
    if (given / "config.json").is_file():
        return Location("hf_folder", given)
    if (given / _DISTRIBUTED_METADATA).is_file():
        return Location("checkpoint", given, _run_dir_of(given))
    if given.name == "checkpoints":
        return Location("checkpoint", _checkpoint_in(given), given.parent)
    run_dir = given if (given / "checkpoints").is_dir() else _newest_version(given)
    if run_dir is None:
        raise FileNotFoundError(
            f"{path}: not a checkpoint, run directory or model folder (expected a .ckpt file, a run folder "
            "with checkpoints/last.ckpt, or an exported folder with config.json)"
        )
    return Location("checkpoint", _checkpoint_in(run_dir / "checkpoints"), run_dir)


def _newest_version(folder: Path) -> Path | None:
    """``folder`` or its ``lightning_logs`` holding ``version_N`` runs → the highest N (None if there are none)."""
    for parent in (folder / "lightning_logs", folder):
        versions = sorted(
            (int(m.group(1)), p)
            for p in parent.glob("version_*")
            if (m := _VERSION.match(p.name)) and (p / "checkpoints").is_dir()
        )
        if versions:
            if len(versions) > 1:
                log.info("%s holds %d runs; using the newest, %s", folder, len(versions), versions[-1][1])
            return versions[-1][1]
    return None


def _checkpoint_in(folder: Path) -> Path:
    if (folder / LAST_CHECKPOINT).exists():
        return folder / LAST_CHECKPOINT
    found = sorted(folder.glob("*.ckpt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{folder}: no checkpoint (*.ckpt) in it; did the run save one?")
    raise FileNotFoundError(
        f"{folder}: no {LAST_CHECKPOINT} and {len(found)} checkpoints ({', '.join(p.name for p in found)}); "
        "pass the one to use"
    )


def _run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory of ``.../version_N/checkpoints/x.ckpt`` (Lightning's layout), if that is where it is."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return None


def read_checkpoint(path: str | Path | Location) -> TrainedCheckpoint:
    """Read a codetune checkpoint (file, sharded folder or run directory) without running any of its code."""
    location = path if isinstance(path, Location) else locate(path)
    if location.kind != "checkpoint":
        raise ValueError(f"{location.path} is an exported model folder, not a training checkpoint")
    raw = _load_raw(location.path)
    hparams = raw.get("hyper_parameters") or {}
    if "model" not in hparams or "state_dict" not in raw:
        raise ValueError(
            f"{location.path}: not a codetune checkpoint (no hyper_parameters['model'] or state_dict); "
            "it must come from `codetune fit`"
        )
    if "codetune_tokenizer" not in raw:
        raise ValueError(
            f"{location.path}: the checkpoint carries no tokenizer (codetune_tokenizer); it must come from "
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
        spec=spec_from_hparams(hparams["model"]),
        tokenizer=tokenizer_from_files(raw["codetune_tokenizer"]),
        state_dict=state_dict,
        global_step=raw.get("global_step"),
    )


def _load_raw(path: Path) -> dict[str, Any]:
    if path.is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)
    try:
        try:
            # mmap: the weights stay on disk until used, so a 7B checkpoint is not read into memory twice.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip format
    except Exception as err:  # UnpicklingError, a truncated zip, ...: name the file, keep it to one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
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


def rebuild_model(checkpoint: TrainedCheckpoint, base_model: str | None = None, merge: bool = True):
    """The trained model in full precision (fp32): the run's spec rebuilt, its trained weights loaded.

    With ``merge`` (default) LoRA/DoRA adapters are merged into the base and a plain ``transformers`` model
    is returned; otherwise adapter runs return the ``PeftModel``. Weights the checkpoint holds only in
    quantized form (QLoRA's 4-bit base) come from the base reloaded unquantized, never from the 4-bit copy.
    ``base_model`` replaces ``model.name_or_path`` (a local folder or Hub id of the same base).
    """
    spec = full_precision_spec(checkpoint.spec, base_model)
    model = build_model(spec, checkpoint.tokenizer)
    load_trained_weights(model, checkpoint.state_dict)
    if merge:
        model = merge_adapters(model)
    model.config.use_cache = True  # training turned the KV cache off; inference wants it back
    return model


def full_precision_spec(spec: ModelSpec, base_model: str | None = None) -> ModelSpec:
    """The run's spec with an unquantized fp32 base and a CPU-safe attention kernel; ``base_model`` swaps the base."""
    if base_model is not None and spec.config is not None:
        raise ValueError(
            "--base_model applies to runs that started from a checkpoint (model.name_or_path); this run "
            "built its model from model.config, so there is no base to point at"
        )
    name = base_model or spec.name_or_path
    if name is not None:
        check_base_available(name, spec.trust_remote_code, from_option=base_model is not None)
    # fp32 so adapters merge without rounding, unquantized so they never merge into 4-bit weights; sdpa
    # because flash-attn needs a GPU and half precision.
    return dataclasses.replace(
        spec,
        name_or_path=name,
        dtype="float32",
        quantization=None,
        attn_implementation="sdpa",
        gradient_checkpointing=False,
    )


def check_base_available(name: str, trust_remote_code: bool = False, from_option: bool = False) -> None:
    """Fail in one line, before any weights are read, when the base model cannot be found.

    The base is a Hub id, a Hugging Face folder, or (for a stage that continued an earlier run) a codetune
    checkpoint or run directory; only configs and checkpoint headers are looked at here.
    """
    from transformers import AutoConfig

    where = "--base_model" if from_option else "the checkpoint's model.name_or_path"
    hint = "" if from_option else "; pass --base_model with a local folder or Hub id of the same base model"
    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        try:
            location = locate(local)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"base model {name} ({where}): {err}{hint}") from None
        if location.kind == "checkpoint":
            return
    if name.startswith((".", "/", "~")) and not local.exists():
        raise FileNotFoundError(f"base model {name} ({where}) does not exist{hint}")
    try:
        AutoConfig.from_pretrained(
            str(local) if local.exists() else name, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"base model {name} ({where}) cannot be loaded: {reason}{hint}") from None


def build_model(spec: ModelSpec, tokenizer):
    """The model exactly as training built it (same loader, same embedding resize), before weights load."""
    from codetune.modules.causal import CausalLM

    return CausalLM(model=spec, tokenizer=tokenizer).build_model()


def load_trained_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy the checkpoint's weights into ``model``; refuse any mismatch rather than export a wrong model.

    Quantized tensors (bitsandbytes 4/8-bit weights and their quantization state) are skipped: the rebuilt
    model holds those layers unquantized, loaded from the base. Any other parameter the checkpoint lacks must
    be frozen in the rebuilt model (it then comes from the base, as it did in training).
    """
    target = model.state_dict()
    quantized = quantized_keys(state_dict)
    load: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        if key in quantized:
            continue
        if key not in target:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}")
        else:
            load[key] = value
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = [key for key in target if key not in load and key not in frozen and key not in quantized]
    problems = [
        (unexpected, "weights the rebuilt model does not have"),
        (mismatched, "shapes that differ from the rebuilt model"),
        (missing, "no trained value for"),
    ]
    for keys, what in problems:
        if keys:
            raise ValueError(
                f"checkpoint does not match the model its spec rebuilds: {len(keys)} {what} "
                f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}); was the base model changed?"
            )
    model.load_state_dict(load, strict=False)


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


def merge_adapters(model):
    """Merge LoRA/DoRA (and trainable token rows) into the base weights; plain models pass through."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def load_for_inference(path: str | Path, base_model: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode from a checkpoint, run directory or exported folder.

    Adapters are merged into a full-precision (fp32) copy of the base, so what is evaluated is what
    ``codetune export`` writes. ``base_model`` replaces the checkpoint's base when that has moved.
    Never runs code from a model folder (``trust_remote_code=False``).
    """
    location = locate(path)
    if location.kind == "adapter_folder":
        raise ValueError(
            f"{path} is a PEFT adapter folder: load it with `PeftModel.from_pretrained(base, '{path}')`, or "
            "point at the training checkpoint (or a full `codetune export`)"
        )
    if location.kind == "hf_folder":
        return load_hf_folder(location.path)
    checkpoint = read_checkpoint(location)
    model = rebuild_model(checkpoint, base_model=base_model, merge=True)
    return model.eval(), checkpoint.tokenizer


def load_hf_folder(folder: Path, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """An exported model folder (weights and tokenizer), in eval mode; never runs code from the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"{folder}: config.json but no weights (*.safetensors); was the export interrupted?"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, dtype=dtype or "auto")
    return model.eval(), tokenizer
