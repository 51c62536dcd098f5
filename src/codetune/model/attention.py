"""Choose the attention kernel a model is loaded with (recipe: ``model.attn_implementation``), and the
document boundaries flash-attn's varlen kernel needs for packed rows."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

AttnImplementation = Literal["auto", "flash_attention_2", "sdpa", "eager"]
_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")
# flash-attn 2 kernels exist for Ampere (sm80) and newer only.
_FLASH_MIN_CAPABILITY = (8, 0)
_BROKEN = "the flash_attn package is installed but does not import"


def resolve_attn_implementation(requested: AttnImplementation, device_type: str) -> str:
    """Turn the recipe's choice into the ``attn_implementation`` transformers loads the model with.

    ``auto`` is flash-attn 2 when the ``flash_attn`` package imports and the device is an Ampere-or-newer CUDA
    GPU, else PyTorch's SDPA; an installed flash-attn that fails to import (a build for another torch) falls back
    to SDPA with a warning. Asking for flash-attn where it cannot run is an error, not a silent fallback, so a
    recipe never trains with a different kernel than it says. The choice is logged.
    """
    if requested not in _CHOICES:
        raise ValueError(f"model.attn_implementation={requested!r} is unknown: use one of {list(_CHOICES)}")
    if requested == "auto":
        problem = _flash_attention_problem(device_type)
        chosen = "sdpa" if problem else "flash_attention_2"
        reason = f"flash-attn unavailable: {problem}" if problem else "flash-attn installed, CUDA device"
        if problem and problem.startswith(_BROKEN):
            log.warning("attn_implementation auto: %s; using sdpa", problem)
    elif requested == "flash_attention_2":
        problem = _flash_attention_problem(device_type)
        if problem:
            raise ValueError(
                f"model.attn_implementation=flash_attention_2 cannot run here: {problem}; "
                "use attn_implementation: sdpa (or auto)"
            )
        chosen, reason = requested, "requested"
    else:
        chosen, reason = requested, "requested"
    log.info("attention implementation: %s (%s)", chosen, reason)
    return chosen


def _flash_attention_problem(device_type: str) -> str | None:
    """Why flash-attn 2 cannot run on ``device_type``, or None if it can."""
    if device_type != "cuda":
        return f"it needs a CUDA GPU and the device is {device_type!r}"
    if not torch.cuda.is_available():
        return "the device is 'cuda' but torch sees no CUDA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed (pip install 'codetune[gpu]')"
    # Installed is not importable: a wheel built for another torch or CUDA fails on import (undefined symbol),
    # and transformers would import it only when the model is built, with a traceback.
    try:
        importlib.import_module("flash_attn")
    except Exception as error:  # ImportError, OSError of the native library, anything the build raises
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        return (
            f"{_BROKEN} ({type(error).__name__}: {detail}); reinstall it for this torch "
            "(pip install --force-reinstall --no-build-isolation flash-attn)"
        )
    capability = torch.cuda.get_device_capability()
    if capability < _FLASH_MIN_CAPABILITY:
        return f"it needs an Ampere or newer GPU (compute capability >= 8.0), this one is {capability[0]}.{capability[1]}"
    return None


def uses_flash_attention(model: Any) -> bool:
    """Whether ``model`` (a transformers or peft model) runs a flash-attn kernel."""
    config = getattr(model, "config", None)
    return "flash" in str(getattr(config, "_attn_implementation", None) or "")


def varlen_inputs(position_ids: torch.Tensor) -> dict[str, Any]:
    """flash-attn varlen metadata for packed rows ``position_ids`` (batch, seq): every document of every row is
    one sequence of the flattened batch (transformers' ``FlashAttentionKwargs``).

    A document starts where the position is 0 and at the start of each row (a row may begin mid-document).
    Computed on the host: ``max_length`` must be a Python int, and the boundaries' count decides a shape.
    """
    rows, length = position_ids.shape
    starts = position_ids.reshape(-1) == 0
    starts[::length] = True
    begin = torch.nonzero(starts).flatten()
    cu = torch.cat([begin, torch.tensor([rows * length])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def pass_document_boundaries(model: torch.nn.Module) -> None:
    """Make every training/scoring forward of ``model`` under flash-attn carry its packed documents' boundaries.

    transformers takes flash-attn's varlen kernel from ``position_ids`` only when the batch is one row; with more
    it runs plain causal flash attention over each whole row and packed documents attend to each other (SDPA and
    eager build a block-diagonal mask from the same ``position_ids`` and are not affected). Given
    ``cu_seq_lens`` it takes the varlen kernel at any batch size, and it no longer infers them itself (a device
    sync in every layer, ~190 per micro-batch with recomputation): the boundaries cost one copy of
    ``position_ids`` to the host per forward. Forwards with a KV cache (generation) are left alone.
    """

    def add_boundaries(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positions = kwargs.get("position_ids")
        if (
            positions is None
            or positions.dim() != 2
            or positions.shape[-1] < 2
            or "cu_seq_lens_q" in kwargs
            or kwargs.get("use_cache") is not False
            or kwargs.get("past_key_values") is not None
            or not uses_flash_attention(module)
        ):
            return None
        varlen = varlen_inputs(positions.detach().cpu())
        device = positions.device
        for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
            varlen[key] = varlen[key].to(device, non_blocking=True)
        return args, {**kwargs, **varlen}

    # On the decoder stack (``LlamaModel``...), which the causal-LM head calls as a module even under peft (peft
    # calls the head's ``forward`` directly, past any hook on it).
    decoder = getattr(model, "base_model", None)
    target = decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else model
    target.register_forward_pre_hook(add_boundaries, with_kwargs=True)
