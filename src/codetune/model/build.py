"""Build the Hugging Face causal LM a recipe names, with its RoPE, embeddings for new tokens and adapter.

Where the weights come from (``model.name_or_path`` or ``model.config``):

- a Hub id or an exported Hugging Face folder (``config.json`` + weights);
- ``config``: a freshly initialised model of any ``model_type`` (tiny models for tests and quickstarts);
- ``base``: a model already built by the caller — the model an earlier codetune run trained, which
  :func:`codetune.checkpoints.trained.build_model` rebuilds when ``name_or_path`` names a run directory.

Then, in order: the recipe's RoPE rescaling is written into the config before weights are used, a quantized base
is loaded through bitsandbytes, the embeddings grow for tokens the tokenizer added (mean-initialised, padded to a
multiple of 64), and the adapter is attached (:mod:`codetune.model.adapters`).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from codetune.model.adapters import (
    DTYPES,
    Adapter,
    Quantization,
    apply_adapter,
    bnb_config,
    check_quantization_supported,
    keep_4bit_layers_trainable,
)
from codetune.model.attention import pass_document_boundaries, resolve_attn_implementation
from codetune.model.rope import (
    RopeScaling,
    apply_rope_scaling,
    keep_rotary_tables_fp32,
    rebuild_rotary_embeddings,
)
from codetune.seeding import run_seed

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """Which model to fine-tune and how to load it."""

    name_or_path: str | None = None
    """A Hub id, a local Hugging Face folder, or a codetune checkpoint (``.ckpt`` file or run directory) to
    continue from."""
    config: dict[str, Any] | None = None
    """Instead of a checkpoint: ``model_type`` plus config fields for a freshly initialised model."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in (mixed precision is the Trainer's ``precision``); with quantization, the
    dtype of the parts left unquantized."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """Attention kernel; ``auto`` takes flash-attn 2 when importable on CUDA, else PyTorch SDPA."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint's repository to run. Off unless the recipe turns it on."""
    pad_vocab_to_multiple_of: int = 64
    """When the tokenizer adds tokens, grow the embedding to a multiple of this (tensor-core friendly)."""
    init_seed: int | None = None
    """Seed for the weights of a model built from ``config`` (and for new embedding rows); ``null``: the run's
    seed (``seed_everything``)."""
    adapter: Adapter = field(default_factory=Adapter)
    """Which weights train: full fine-tuning, LoRA or DoRA (with ``quantization``: QLoRA)."""
    quantization: Quantization | None = None
    """Load the frozen base in 4-bit (NF4/FP4) or 8-bit through bitsandbytes; needs a LoRA/DoRA adapter."""
    rope: RopeScaling | None = None
    """RoPE rescaling for a longer context; replaces the base's own setting (see ``RopeScaling``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``from_pretrained``."""

    def __post_init__(self) -> None:
        if self.name_or_path in ("None", "null"):
            # jsonargparse (4.53) turns `--model.init_args.model.name_or_path=null` into the string "None" inside
            # a subclass's init_args; no model is called that, so read it as the null the user wrote.
            self.name_or_path = None
        # Checkpoint hparams hold the spec as plain dicts (``asdict``); turn the nested parts back into dataclasses.
        for name, cls in (("adapter", Adapter), ("quantization", Quantization), ("rope", RopeScaling)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))

    def validate(self) -> None:
        """Check the spec once, before anything is loaded (the recipe check; later callers get it for free)."""
        if self.__dict__.get("_validated"):
            return
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                "model: give exactly one of `name_or_path` (a checkpoint) or `config` (a new model)"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a `model_type` (e.g. llama, mistral, qwen2, starcoder2)")
        if self.name_or_path:
            local = Path(self.name_or_path).expanduser()
            if self.name_or_path.endswith(".ckpt") and not local.is_file():
                raise FileNotFoundError(
                    f"model.name_or_path: checkpoint {self.name_or_path} does not exist; run the stage that "
                    "writes it first (paths are relative to the current directory)"
                )
            if self.name_or_path.startswith((".", "/", "~")) and not local.exists():
                raise FileNotFoundError(f"model.name_or_path: {self.name_or_path} does not exist")
            if not local.exists():
                _check_hub_id(self.name_or_path, self.extra)
        if self.config is not None:
            _check_config_keys(self.config)
        self.adapter.validate()
        if self.quantization is not None:
            self.quantization.validate()
            if self.adapter.method == "full":
                raise ValueError(
                    "model.quantization freezes the base in 4/8 bit, so adapter.method=full cannot train it: "
                    "set model.adapter.method to lora or dora (QLoRA), or remove model.quantization"
                )
        self.__dict__["_validated"] = True  # not a field: asdict, replace and checkpoints never carry it


def load_model(
    spec: ModelSpec, tokenizer=None, base: Any = None, base_vocab: int | None = None, meta: bool = False
):
    """The model to train: weights loaded, RoPE rescaled, embeddings fitted to ``tokenizer``, adapter attached.

    ``base`` (with the size ``base_vocab`` of its tokenizer) replaces loading ``spec.name_or_path``: the caller
    built it, e.g. the merged model of an earlier stage. Returns a ``transformers`` model, or a
    ``peft.PeftModelForCausalLM`` under LoRA/DoRA.

    ``meta``: the same model on the meta device, no weights read and no memory taken (the ranks of a sharded
    run that receive their shards from rank 0, :func:`codetune.model.sharding.shard_from_rank0`); not for
    quantized bases or a ``base`` handed in.
    """
    from transformers import AutoModelForCausalLM

    spec.validate()
    if meta:
        if spec.quantization is not None or base is not None:
            raise ValueError("load_model(meta=True) builds neither quantized bases nor a base handed in")
        with torch.device("meta"):
            return _load_model_on_meta(spec, tokenizer)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.quantization is not None:
        check_quantization_supported(spec.quantization, _quantization_device(device_type))
    attn = resolve_attn_implementation(spec.attn_implementation, device_type)
    dtype = DTYPES[spec.dtype]
    source = "config" if spec.config is not None else "base" if base is not None else "pretrained"
    if source == "config":
        config = base_config(spec, tokenizer)
        config._attn_implementation = attn
        if spec.rope is not None:
            apply_rope_scaling(config, spec.rope)
        with torch.random.fork_rng():
            torch.manual_seed(run_seed(spec.init_seed))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    elif source == "base":
        model = base.to(dtype)
        if attn != model.config._attn_implementation:
            model.set_attn_implementation(attn)
        if spec.rope is not None:
            apply_rope_scaling(model.config, spec.rope)
            rebuild_rotary_embeddings(model)
    else:
        config = base_config(spec)
        if spec.rope is not None:
            # Before the weights load: the rotary tables are built from the config.
            apply_rope_scaling(config, spec.rope)
        kwargs = {}
        if spec.quantization is not None:
            kwargs = dict(
                quantization_config=bnb_config(spec.quantization),
                device_map={"": _quantization_device(device_type)},
            )
        model = _from_hub(
            AutoModelForCausalLM.from_pretrained,
            spec.name_or_path,
            config=config,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=spec.trust_remote_code,
            **kwargs,
            **spec.extra,
        )
        base_vocab = _base_tokenizer_size(spec, tokenizer)
    if spec.quantization is not None and source != "pretrained":
        model = _quantized_copy(model, spec, attn, device_type)
    if spec.quantization is not None:
        keep_4bit_layers_trainable(model)
    model = _finish(model, spec, tokenizer, base_vocab, source)
    log.info(
        "loaded %s with %s attention%s",
        spec.name_or_path or spec.config["model_type"],
        attn,
        f", adapter {spec.adapter.method}" if spec.adapter.method != "full" else "",
    )
    return model


def _finish(model, spec: ModelSpec, tokenizer, base_vocab: int | None, source: str):
    """Embeddings fitted to the tokenizer, checkpointing, fp32 RoPE tables, the adapter: the steps after loading."""
    new_rows: list[int] = []
    if tokenizer is not None:
        new_rows = fit_embeddings(
            model, tokenizer, spec.pad_vocab_to_multiple_of, run_seed(spec.init_seed), base_vocab
        )
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    keep_rotary_tables_fp32(model)
    pass_document_boundaries(model)
    # A freshly initialised model trains every row: its "new" tokens are not new.
    return apply_adapter(
        model, spec.adapter, new_rows if source != "config" else (), quantized=spec.quantization is not None
    )


def _load_model_on_meta(spec: ModelSpec, tokenizer=None):
    """:func:`load_model`'s model on the meta device (called under ``torch.device("meta")``): the same config,
    embedding rows and adapter, built from the config alone."""
    from transformers import AutoModelForCausalLM

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    attn = resolve_attn_implementation(spec.attn_implementation, device_type)
    config = base_config(spec, tokenizer if spec.config is not None else None)
    config._attn_implementation = attn
    if spec.rope is not None:
        apply_rope_scaling(config, spec.rope)
    model = AutoModelForCausalLM.from_config(
        config, dtype=DTYPES[spec.dtype], attn_implementation=attn, trust_remote_code=spec.trust_remote_code
    )
    base_vocab = _base_tokenizer_size(spec, tokenizer) if spec.config is None else None
    source = "config" if spec.config is not None else "pretrained"
    return _finish(model, spec, tokenizer, base_vocab, source)


def base_config(spec: ModelSpec, tokenizer=None):
    """The base model's ``transformers`` config before ``spec.rope`` is applied (no model is built).

    With ``tokenizer``, a config-built model's vocabulary is sized to it. (For a codetune run directory, see
    :func:`codetune.checkpoints.trained.trained_base_config`.)
    """
    from transformers import AutoConfig

    if spec.config is not None:
        values = dict(spec.config)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        if tokenizer is not None:
            config.vocab_size = _padded(len(tokenizer), spec.pad_vocab_to_multiple_of)
        return config
    return _from_hub(AutoConfig.from_pretrained, spec.name_or_path, trust_remote_code=spec.trust_remote_code)


def fit_embeddings(
    model, tokenizer, multiple_of: int = 64, seed: int = 0, base_vocab: int | None = None
) -> list[int]:
    """Grow the embeddings when the tokenizer has more tokens than the model; set special token ids.

    Returns the ids of the tokens that are new to the base: ``base_vocab`` (the base tokenizer's size, when
    known) or else the embedding's rows before growing, up to the tokenizer's size. Padding rows beyond the
    tokenizer are never used, so they are not counted.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            # mean_resizing: new rows start at the mean embedding (Hewitt 2021), so the new sentinels do not
            # dominate the softmax before they are trained. (A model on the meta device only takes the shape:
            # its values come from rank 0's.)
            meta = model.get_input_embeddings().weight.is_meta
            model.resize_token_embeddings(
                len(tokenizer), pad_to_multiple_of=multiple_of, mean_resizing=not meta
            )
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        # A tokenizer without a BOS (ours, StarCoder's) must not leave the architecture's default BOS id (1 for
        # Llama) in the exported config, where it would name some other token.
        if value is not None or name == "bos_token_id":
            setattr(model.config, name, value)
            if model.generation_config is not None:
                setattr(model.generation_config, name, value)
    first_new = min(rows, base_vocab) if base_vocab is not None else rows
    return list(range(first_new, len(tokenizer)))


def check_tokenizer_extends(base_vocab: dict[str, int], tokenizer, base: str) -> None:
    """Refuse a run tokenizer that gives any of the base's tokens another id (it would train on garbage)."""
    vocab = tokenizer.get_vocab()
    moved = [(t, i, vocab.get(t)) for t, i in base_vocab.items() if vocab.get(t) != i]
    if moved:
        examples = ", ".join(f"{t!r}: {i} -> {j}" for t, i, j in moved[:3])
        raise ValueError(
            f"the run's tokenizer disagrees with the tokenizer of {base} on {len(moved)} tokens ({examples}); "
            "load the base's tokenizer (data.tokenizer.name_or_path) so token ids keep their meaning"
        )


def absolute_base(name_or_path: str | None) -> str | None:
    """``model.name_or_path`` as a run records it: a local folder or checkpoint as an absolute path (so the run
    works from any directory), a Hub id unchanged (its revision is recorded once loaded)."""
    if not name_or_path:
        return name_or_path
    local = Path(name_or_path).expanduser()
    return str(local.resolve()) if local.exists() else name_or_path


def _check_hub_id(name: str, extra: dict[str, Any] | None = None) -> None:
    """Fail now, before any data is built, for a ``name_or_path`` that is neither on disk nor obtainable."""
    from huggingface_hub import constants, try_to_load_from_cache

    missing = f"model.name_or_path: {name} is no file or folder here ({Path.cwd()})"
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise FileNotFoundError(f"{missing}; run the stage that writes it first, or fix the path")
    if not constants.HF_HUB_OFFLINE:
        return
    where = {k: (extra or {}).get(k) for k in ("revision", "cache_dir")}
    subfolder = (extra or {}).get("subfolder")
    filename = f"{subfolder}/config.json" if subfolder else "config.json"
    if not isinstance(try_to_load_from_cache(name, filename, **where), str):
        raise FileNotFoundError(
            f"{missing}, nor a Hub model in the local cache, and HF_HUB_OFFLINE is set: if it is a run folder, run "
            "the stage that writes it first (from this folder); if it is a Hub model, download it or unset "
            "HF_HUB_OFFLINE"
        )


def _check_config_keys(values: dict[str, Any]) -> None:
    """A misspelt ``model.config`` key would silently fall back to the architecture's default (32 layers for a
    misspelt ``num_hidden_layers``). A key close to a known one is refused with the likely spelling; any other key
    the architecture's config does not define is kept (transformers stores it, and some models read such keys,
    e.g. ``head_dim``) with a warning."""
    import difflib

    from transformers import CONFIG_MAPPING

    model_type = values["model_type"]
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise ValueError(
            f"model.config.model_type: {model_type!r} is not a transformers architecture"
            + (
                f" (did you mean {', '.join(close)}?)"
                if close
                else " (e.g. llama, mistral, qwen2, starcoder2)"
            )
        )
    cls = CONFIG_MAPPING[model_type]
    config, default = cls(**{k: v for k, v in values.items() if k != "model_type"}), cls()
    known = set(vars(default)) | set(getattr(cls, "attribute_map", {}))
    for key in sorted(k for k in values if k in vars(config) and k not in known and not hasattr(default, k)):
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.9)
        if close:
            raise ValueError(
                f"model.config.{key}: {cls.__name__} has no such key; did you mean {close[0]}? (as written it is "
                f"ignored and {close[0]} keeps its default)"
            )
        log.warning("model.config.%s is not a field of %s; transformers keeps it as given", key, cls.__name__)


def _from_hub(load: Callable[..., Any], name_or_path: str, **kwargs: Any) -> Any:
    """``load(name_or_path)``, with a Hub failure named by the recipe key that asked for it."""
    try:
        return load(_local_or_hub(name_or_path), **kwargs)
    except OSError as err:
        if Path(name_or_path).expanduser().exists():
            raise
        # Whole, on one line: for a gated repository the advice (request access, log in) is in the later lines.
        reason = " ".join(str(err).split()) or type(err).__name__
        raise OSError(
            f"model.name_or_path: {name_or_path} is no file or folder here ({Path.cwd()}) and loading it from the "
            f"Hub failed: {reason}"
        ) from err


def _local_or_hub(name_or_path: str) -> str:
    local = Path(name_or_path).expanduser()
    return str(local) if local.exists() else name_or_path


def _quantization_device(device_type: str) -> str:
    # Under DDP each process has already selected its own GPU; quantize straight onto it.
    return f"cuda:{torch.cuda.current_device()}" if device_type == "cuda" else "cpu"


def _base_tokenizer_size(spec: ModelSpec, tokenizer) -> int | None:
    """Size of the base model's own tokenizer, when it ships one: tokens past it are new even if the base's
    embedding already had (untrained) padding rows for them. Also checks the run's tokenizer extends it."""
    if tokenizer is None:
        return None
    from transformers import AutoTokenizer

    try:
        base = AutoTokenizer.from_pretrained(
            _local_or_hub(spec.name_or_path), trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError, TypeError) as error:
        log.debug(
            "no tokenizer with %s (%s): new tokens are the rows the embedding grows", spec.name_or_path, error
        )
        return None
    check_tokenizer_extends(base.get_vocab(), tokenizer, spec.name_or_path)
    return len(base)


def _quantized_copy(model, spec: ModelSpec, attn: str, device_type: str):
    """Quantize a model that did not come from ``from_pretrained`` by saving and reloading it through
    bitsandbytes, the one path that quantizes every linear layer the way a Hub base would be."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="codetune-quantize-") as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(
            tmp,
            dtype=DTYPES[spec.dtype],
            attn_implementation=attn,
            quantization_config=bnb_config(spec.quantization),
            device_map={"": _quantization_device(device_type)},
        )


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n
