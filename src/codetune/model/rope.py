"""RoPE rescaling for long-context fine-tuning, written where transformers 5.x reads it.

transformers 5.x builds a model's rotary embedding from ``config.rope_parameters`` (``rope_type``,
``rope_theta``, ``factor``, ...); a top-level ``config.rope_theta`` is silently ignored and would be saved as a
stale duplicate. :func:`apply_rope_scaling` replaces the base's RoPE entry with the recipe's and removes such
duplicates, so the exported ``config.json`` carries exactly the values the model was trained with.

Methods (formulas: transformers ``modeling_rope_utils.ROPE_INIT_FUNCTIONS``):

- ``theta``: change the base period, Code Llama's long-context recipe (θ 1e4 → 1e6, Rozière et al. 2023 §2.4).
- ``linear``: position interpolation, every frequency divided by ``factor`` (Chen et al. 2023).
- ``dynamic``: NTK-aware base growth recomputed from the running sequence length (bloc97/emozilla).
- ``yarn``: NTK-by-parts interpolation plus an attention temperature (Peng et al. 2023).
- ``llama3``: Llama 3.1's per-band frequency scaling.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

RopeScalingType = Literal["theta", "linear", "dynamic", "yarn", "llama3"]

# Fields each method reads besides `type`; anything else set in the recipe is a mistake worth reporting.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "theta": ("theta",),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
_OPTIONAL: dict[str, tuple[str, ...]] = {
    "theta": ("max_position_embeddings",),
    "linear": ("theta", "original_max_position_embeddings", "max_position_embeddings"),
    # transformers' dynamic NTK treats `config.max_position_embeddings` as the original length (see below).
    "dynamic": ("theta", "original_max_position_embeddings"),
    "yarn": (
        "theta",
        "original_max_position_embeddings",
        "max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
    ),
    "llama3": ("theta", "original_max_position_embeddings", "max_position_embeddings"),
}
_FIELDS = (
    "theta",
    "factor",
    "original_max_position_embeddings",
    "max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "low_freq_factor",
    "high_freq_factor",
)
# Keys of a RoPE entry that describe the architecture (which head dims rotate), not a scaling: kept as they are.
_STRUCTURAL_KEYS = ("partial_rotary_factor", "mrope_section")
# In configs whose RoPE is keyed by layer type (Gemma 3, Mellum, OLMo 3), the long-range layers are rescaled;
# sliding-window layers never see positions beyond their window. transformers maps a legacy `rope_scaling`
# onto this same entry.
_LONG_RANGE_LAYER_TYPE = "full_attention"


@dataclass
class RopeScaling:
    """How to rescale a model's rotary position embedding for a longer context (recipe: ``model.rope``).

    The setting replaces the base's own RoPE setting; it is never composed with it, so a base that is already
    scaled must have its target restated in full. DeepSeek-Coder ships ``linear`` ×4 (16K): doubling its context
    is ``type: linear, factor: 8``, not ``factor: 2``. Code Llama ships θ = 1e6: ``type: theta`` takes the
    absolute target (``theta: 1_000_000`` restates it), while the other methods keep the base's θ unless
    ``theta`` is given.
    """

    type: RopeScalingType
    """``theta`` (change the base period, Code Llama), ``linear`` (position interpolation), ``dynamic``
    (dynamic NTK), ``yarn`` or ``llama3``."""
    theta: float | None = None
    """Base period θ, absolute (e.g. ``1_000_000``), not a multiplier. Required for ``theta``; for the other
    methods it defaults to the base model's own θ."""
    factor: float | None = None
    """Context extension factor (> 1), relative to ``original_max_position_embeddings``. Required for
    ``linear``, ``dynamic``, ``yarn`` and ``llama3``."""
    original_max_position_embeddings: int | None = None
    """Context length the base was trained at; defaults to the base config's ``max_position_embeddings``."""
    max_position_embeddings: int | None = None
    """New context length written to the config. Defaults to ``original × factor`` (``theta``: unchanged).
    Not settable for ``dynamic``, which rescales from the running length beyond the original one."""
    beta_fast: float | None = None
    """YaRN: rotations per original context above which a dimension is extrapolated (transformers: 32)."""
    beta_slow: float | None = None
    """YaRN: rotations per original context below which a dimension is interpolated (transformers: 1)."""
    attention_factor: float | None = None
    """YaRN: attention temperature applied to cos/sin (default ``0.1·ln(factor) + 1``, the paper's)."""
    low_freq_factor: float | None = None
    """llama3: wavelengths longer than ``original / low_freq_factor`` are divided by ``factor`` (Llama 3.1: 1)."""
    high_freq_factor: float | None = None
    """llama3: wavelengths shorter than ``original / high_freq_factor`` are kept (Llama 3.1: 4)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject settings that cannot mean anything, before a model is loaded."""
        if self.type not in _REQUIRED:
            raise ValueError(f"rope.type={self.type!r} is unknown: use one of {sorted(_REQUIRED)}")
        given = {name for name in _FIELDS if getattr(self, name) is not None}
        missing = [name for name in _REQUIRED[self.type] if name not in given]
        if missing:
            raise ValueError(f"rope.type={self.type!r} needs {', '.join('rope.' + m for m in missing)}")
        unused = sorted(given - set(_REQUIRED[self.type]) - set(_OPTIONAL[self.type]))
        if unused:
            hint = ""
            if self.type == "dynamic" and "max_position_embeddings" in unused:
                hint = (
                    "; dynamic NTK rescales relative to config.max_position_embeddings, which therefore stays"
                    " at the original length (set original_max_position_embeddings instead)"
                )
            raise ValueError(
                f"rope.type={self.type!r} does not use {', '.join('rope.' + u for u in unused)}: remove "
                f"{'it' if len(unused) == 1 else 'them'}{hint}"
            )
        if self.factor is not None and not self.factor > 1:
            raise ValueError(
                f"rope.factor={self.factor} must be > 1 (it is the context extension ratio); "
                "to keep the base's RoPE, leave model.rope unset"
            )
        for name in (
            "theta",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "low_freq_factor",
            "high_freq_factor",
        ):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"rope.{name}={value} must be > 0")
        for name in ("original_max_position_embeddings", "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"rope.{name}={value!r} must be a positive integer")
        if (self.beta_fast or 32) <= (self.beta_slow or 1):
            raise ValueError(
                f"rope.beta_fast ({self.beta_fast or 32}) must exceed rope.beta_slow ({self.beta_slow or 1})"
            )
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"rope.high_freq_factor ({self.high_freq_factor}) must exceed rope.low_freq_factor "
                f"({self.low_freq_factor})"
            )


def apply_rope_scaling(config: PretrainedConfig, scaling: RopeScaling) -> None:
    """Rewrite ``config`` in place so a model built from it uses ``scaling``'s RoPE.

    Writes ``config.rope_parameters`` (for configs keyed by layer type, its ``full_attention`` entry) and
    ``config.max_position_embeddings``, and drops top-level ``rope_theta``/``rope_scaling`` leftovers so
    ``save_pretrained`` carries the new values only. The base's scaling is replaced, not composed (see
    :class:`RopeScaling`); only structural keys such as ``partial_rotary_factor`` are kept. Call it before the
    model is built, or call :func:`rebuild_rotary_embeddings` afterwards.

    Raises ValueError for a model without a configurable RoPE (GPT-2/GPT-BigCode absolute positions, ALiBi,
    GPT-J's fixed rotary) and for settings that :meth:`RopeScaling.validate` rejects.
    """
    scaling.validate()  # again: a notebook may edit a parsed setting
    model_type = getattr(config, "model_type", type(config).__name__)
    entry_key = _rope_entry_key(config, model_type)
    rope_parameters: dict[str, Any] = config.rope_parameters
    old = dict(rope_parameters if entry_key is None else rope_parameters[entry_key])

    base_theta = old.get("rope_theta", getattr(config, "default_theta", 10_000.0))
    original = scaling.original_max_position_embeddings or config.max_position_embeddings
    new: dict[str, Any] = {
        "rope_type": "default" if scaling.type == "theta" else scaling.type,
        "rope_theta": float(scaling.theta if scaling.theta is not None else base_theta),
    }
    new.update({key: old[key] for key in _STRUCTURAL_KEYS if key in old})
    if scaling.type != "theta":
        new["factor"] = float(scaling.factor)
    if scaling.type in ("yarn", "llama3"):
        new["original_max_position_embeddings"] = original
    for key in ("beta_fast", "beta_slow", "attention_factor", "low_freq_factor", "high_freq_factor"):
        # validate() has already refused these keys for the methods that do not read them.
        if getattr(scaling, key) is not None:
            new[key] = float(getattr(scaling, key))

    if scaling.type == "dynamic":
        # transformers' dynamic NTK grows the base once the sequence exceeds max_position_embeddings.
        max_positions = original
    elif scaling.type == "theta":
        max_positions = scaling.max_position_embeddings or config.max_position_embeddings
    else:
        max_positions = scaling.max_position_embeddings or round(original * scaling.factor)

    old_kind = old.get("rope_type", old.get("type", "default"))
    if old_kind != "default":
        log.warning(
            "%s: replacing the base's RoPE %s with %s (not composed); restate the full target if the base "
            "was already scaled",
            model_type,
            {k: v for k, v in old.items() if k != "type"},
            new,
        )

    old_max_positions = config.max_position_embeddings
    config.rope_parameters = new if entry_key is None else {**rope_parameters, entry_key: new}
    config.max_position_embeddings = max_positions
    try:
        config.validate_rope()  # the model family's own checks, e.g. Phi-3 accepts longrope only
    except (ValueError, KeyError) as error:
        config.rope_parameters, config.max_position_embeddings = rope_parameters, old_max_positions
        raise ValueError(
            f"model type {model_type!r} does not accept rope.type={scaling.type!r}: {error}"
        ) from None
    _drop_stale_duplicates(config, new, original)
    log.info(
        "%s RoPE: %s, max_position_embeddings %d", model_type, _describe(new), config.max_position_embeddings
    )


def keep_rotary_tables_fp32(model: torch.nn.Module) -> int:
    """Keep every rotary module's frequency buffers (``inv_freq``, ``original_inv_freq``, ...) in float32, whatever
    the model is cast to. Returns how many modules are guarded.

    ``trainer.precision: bf16-true`` casts the whole module to bf16 (Lightning's ``HalfPrecision``), buffers
    included; transformers multiplies ``position × inv_freq`` in float32 but from the already rounded
    frequencies, so at θ = 1e6 and head_dim 128 the angles are off by ~4.7 rad at position 4,095 and ~19 rad at
    16,383. A forward pre-hook puts the float32 values back (once per cast: it compares dtypes only) before the
    module runs; the float32 copy follows updates a dynamic RoPE makes.
    """
    import torch

    guarded = 0
    for module in model.modules():
        names = [
            n for n, b in module.named_buffers(recurse=False) if n.endswith("inv_freq") and b is not None
        ]
        if not names or not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        kept = {name: getattr(module, name) for name in names}

        def restore(module: torch.nn.Module, args: Any, kept: dict[str, torch.Tensor] = kept) -> None:
            for name in kept:
                current = getattr(module, name)
                if current.dtype == torch.float32:
                    kept[name] = current  # the newest float32 values (dynamic RoPE replaces the tensor)
                elif not kept[name].is_meta:
                    setattr(module, name, kept[name].to(current.device))
                    kept[name] = getattr(module, name)

        module.register_forward_pre_hook(restore)
        module._codetune_fp32_tables = kept  # remember_rotary_tables updates it
        guarded += 1
    return guarded


def remember_rotary_tables(model: torch.nn.Module) -> None:
    """Record the current float32 rotary tables as the ones :func:`keep_rotary_tables_fp32` restores: for a model
    built on the meta device, once its buffers hold real values (before a bf16 cast could round them)."""
    import torch

    for module in model.modules():
        kept = getattr(module, "_codetune_fp32_tables", None)
        for name in kept or ():
            current = getattr(module, name)
            if current.dtype == torch.float32 and not current.is_meta:
                kept[name] = current


def rebuild_rotary_embeddings(model: torch.nn.Module) -> int:
    """Recompute the rotary embedding modules of an already built model from its (rescaled) config.

    transformers computes ``inv_freq`` once, when the model is built; after :func:`apply_rope_scaling` on the
    config of a loaded model, this makes the modules match it. Returns how many modules were rebuilt.
    """
    rebuilt = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not (type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "config")):
                continue
            old_freq = next(child.buffers(), None)
            fresh = type(child)(child.config)
            if old_freq is not None:
                fresh.to(old_freq.device)
            setattr(parent, name, fresh)
            rebuilt += 1
    return rebuilt


def _rope_entry_key(config: PretrainedConfig, model_type: str) -> str | None:
    """The key of the RoPE entry to rewrite (None: the flat dict), or a clear error if there is no RoPE."""
    rope_parameters = getattr(config, "rope_parameters", None)
    no_rope = None
    if not isinstance(rope_parameters, dict) or not rope_parameters:
        no_rope = "its config has no rope_parameters (absolute or ALiBi positions, or a fixed rotary)"
    elif getattr(config, "alibi", False):
        no_rope = "it uses ALiBi (config.alibi=True)"
    elif hasattr(config, "position_embedding_type") and config.position_embedding_type not in (
        "rope",
        "rotary",
    ):
        no_rope = f"config.position_embedding_type={config.position_embedding_type!r}"
    if no_rope:
        raise ValueError(
            f"model.rope is set but model type {model_type!r} has no rescalable RoPE: {no_rope}; "
            "remove model.rope or use a RoPE model (Llama, Mistral, Qwen2, StarCoder2, ...)"
        )
    # A flat entry holds numbers and lists only; a nested one maps layer types to entries. transformers'
    # `nested_rope_parameter_keys` only lists the types present in `layer_types`, so look at the values.
    nested = [key for key, value in rope_parameters.items() if isinstance(value, dict)]
    if not nested:
        return None
    if _LONG_RANGE_LAYER_TYPE not in nested:
        raise ValueError(
            f"model type {model_type!r} keys its RoPE by layer type {nested} without a "
            f"{_LONG_RANGE_LAYER_TYPE!r} entry; codetune does not know which layers to rescale"
        )
    return _LONG_RANGE_LAYER_TYPE


def _declares(config: PretrainedConfig, name: str) -> bool:
    return (
        name in {field.name for field in dataclasses.fields(config)}
        if dataclasses.is_dataclass(config)
        else False
    )


def _drop_stale_duplicates(config: PretrainedConfig, new: dict[str, Any], original: int) -> None:
    """Remove top-level copies of RoPE values (or, where the config class declares them, make them agree)."""
    duplicates = {"rope_theta": new["rope_theta"], "original_max_position_embeddings": original}
    for name, value in duplicates.items():
        if _declares(config, name):
            # A declared field cannot be deleted, and transformers prefers e.g. Phi-3's top-level
            # original_max_position_embeddings over rope_parameters: keep it equal to the new value.
            if getattr(config, name, None) is not None:
                setattr(config, name, value)
        elif name in vars(config):
            delattr(config, name)
    if "rope_scaling" in vars(config):
        delattr(config, "rope_scaling")


def _describe(parameters: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in parameters.items())
