"""The one way to get a trained model back: for export, evaluation, notebooks, and a stage that continues a run.

:func:`load_trained` takes what a user points at (a checkpoint, a run directory or an exported folder) and
returns the model in eval mode with its tokenizer. A training checkpoint is rebuilt exactly as training built it
(:func:`build_training_model`: the run's spec through the same model builder, same embedding rows, same adapter), in
float32 with PyTorch SDPA attention — adapters merge without rounding and never into 4-bit weights, and SDPA
runs everywhere — and only then are its weights loaded and its adapters merged. A consumer that wants another
kernel (a continuing stage on GPUs) switches it afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from codetune.checkpoints.format import TrainedCheckpoint, quantized_keys, read_checkpoint
from codetune.checkpoints.locate import is_training_checkpoint, locate
from codetune.errors import first_line
from codetune.model.build import ModelSpec, base_config, check_tokenizer_extends, load_model
from codetune.model.rope import apply_rope_scaling

log = logging.getLogger(__name__)

REBUILD_ATTENTION = "sdpa"
"""The kernel a trained model is rebuilt with (flash-attn needs a GPU and half precision)."""


def build_training_model(spec: ModelSpec, tokenizer: Any = None, meta: bool = False):
    """The model a recipe trains, before any trained weights of *this* run: ``model.build.load_model``, except that
    a ``model.name_or_path`` naming a codetune checkpoint continues the model that run trained (rebuilt, its
    adapter merged), so one stage starts where the previous one ended (``recipes/tiny-lcft.yaml``).
    ``meta``: the model on the meta device, without weights (not for a continued run)."""
    if not is_training_checkpoint(spec.name_or_path):
        return load_model(spec, tokenizer, meta=meta)
    location = locate(spec.name_or_path)
    trained = read_checkpoint(location)
    if tokenizer is not None:
        check_tokenizer_extends(trained.tokenizer.get_vocab(), tokenizer, f"checkpoint {location.path}")
    base = rebuild_model(trained)
    method = trained.spec.adapter.method
    how = "all weights trained" if method == "full" else f"{method} adapter merged"
    log.info("continuing from %s (step %s, %s)", location.path, trained.global_step, how)
    return load_model(spec, tokenizer, base=base, base_vocab=len(trained.tokenizer))


def trained_base_config(spec: ModelSpec, tokenizer: Any = None):
    """The ``transformers`` config of the base ``spec`` starts from, before ``spec.rope``: for a codetune checkpoint,
    the architecture that run trained, its own RoPE rescaling included."""
    if not is_training_checkpoint(spec.name_or_path):
        return base_config(spec, tokenizer)
    trained = read_checkpoint(locate(spec.name_or_path))
    config = trained_base_config(trained.spec)
    if trained.spec.rope is not None:
        apply_rope_scaling(config, trained.spec.rope)
    return config


def rebuild_model(checkpoint: TrainedCheckpoint, base_model: str | None = None, merge: bool = True):
    """The trained model in full precision (fp32): the run's spec rebuilt, its trained weights loaded.

    With ``merge`` (default) LoRA/DoRA adapters are merged into the base and a plain ``transformers`` model
    is returned; otherwise adapter runs return the ``PeftModel``. Weights the checkpoint holds only in
    quantized form (QLoRA's 4-bit base) come from the base reloaded unquantized, never from the 4-bit copy.
    ``base_model`` replaces ``model.name_or_path`` (a local folder or Hub id of the same base).
    """
    spec = full_precision_spec(checkpoint.spec, base_model)
    model = build_training_model(spec, checkpoint.tokenizer)
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
    return dataclasses.replace(
        spec,
        name_or_path=name,
        dtype="float32",
        quantization=None,
        attn_implementation=REBUILD_ATTENTION,
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
        reason = first_line(err)
        raise FileNotFoundError(f"base model {name} ({where}) cannot be loaded: {reason}{hint}") from None


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


def merge_adapters(model):
    """Merge LoRA/DoRA (and trainable token rows) into the base weights; plain models pass through."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def load_trained(path: str | Path, base_model: str | None = None) -> tuple[Any, Any]:
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


def peek_trained(path: str | Path, base_model: str | None = None) -> tuple[Any, int | None]:
    """``(tokenizer, context length)`` of what :func:`load_trained` would load, reading no weights: commands check
    a model's FIM tokens and context from here before minutes of loading (a 7B)."""
    location = locate(path)
    if location.kind == "adapter_folder":
        load_trained(path)  # its one-line refusal
    if location.kind == "hf_folder":
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(location.path, trust_remote_code=False)
        config = AutoConfig.from_pretrained(location.path, trust_remote_code=False)
        return tokenizer, getattr(config, "max_position_embeddings", None)
    checkpoint = read_checkpoint(location)  # memory-mapped: the weights stay on disk
    spec = full_precision_spec(checkpoint.spec, base_model)
    config = trained_base_config(spec, checkpoint.tokenizer)
    if spec.rope is not None:
        apply_rope_scaling(config, spec.rope)
    return checkpoint.tokenizer, getattr(config, "max_position_embeddings", None)


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
