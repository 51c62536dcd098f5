"""Choose the attention kernel a model is loaded with (recipe: ``model.attn_implementation``)."""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal

import torch

log = logging.getLogger(__name__)

AttnImplementation = Literal["auto", "flash_attention_2", "sdpa", "eager"]
_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")
# flash-attn 2 kernels exist for Ampere (sm80) and newer only.
_FLASH_MIN_CAPABILITY = (8, 0)


def resolve_attn_implementation(requested: AttnImplementation, device_type: str) -> str:
    """Turn the recipe's choice into the ``attn_implementation`` transformers loads the model with.

    ``auto`` is flash-attn 2 when the ``flash_attn`` package is installed and the device is an Ampere-or-newer
    CUDA GPU, else PyTorch's SDPA. Asking for flash-attn where it cannot run is an error, not a silent fallback,
    so a recipe never trains with a different kernel than it says. The choice is logged.
    """
    if requested not in _CHOICES:
        raise ValueError(f"model.attn_implementation={requested!r} is unknown: use one of {list(_CHOICES)}")
    if requested == "auto":
        problem = _flash_attention_problem(device_type)
        chosen = "sdpa" if problem else "flash_attention_2"
        reason = f"flash-attn unavailable: {problem}" if problem else "flash-attn installed, CUDA device"
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
    capability = torch.cuda.get_device_capability()
    if capability < _FLASH_MIN_CAPABILITY:
        return f"it needs an Ampere or newer GPU (compute capability >= 8.0), this one is {capability[0]}.{capability[1]}"
    return None
