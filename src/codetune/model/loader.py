"""Build the Hugging Face causal LM a recipe names: from a checkpoint, or from a config for a tiny model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Which model to fine-tune and how to load it."""

    name_or_path: str | None = None
    """Any ``AutoModelForCausalLM`` checkpoint: a local folder or a Hub id."""
    config: dict[str, Any] | None = None
    """Instead of a checkpoint: ``model_type`` plus config fields for a freshly initialised model."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in (mixed precision is the Trainer's ``precision``)."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """Attention kernel; ``auto`` takes flash-attn 2 when importable on CUDA, else PyTorch SDPA."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint's repository to run. Off unless the recipe turns it on."""
    pad_vocab_to_multiple_of: int = 64
    """When the tokenizer adds tokens, grow the embedding to a multiple of this (tensor-core friendly)."""
    init_seed: int = 0
    """Seed for the weights of a model built from ``config`` (and for new embedding rows)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``from_pretrained``."""

    def validate(self) -> None:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                "model: give exactly one of `name_or_path` (a checkpoint) or `config` (a new model)"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a `model_type` (e.g. llama, mistral, qwen2, starcoder2)")
        if self.name_or_path and self.name_or_path.startswith((".", "/", "~")):
            if not Path(self.name_or_path).expanduser().exists():
                raise FileNotFoundError(f"model.name_or_path: {self.name_or_path} does not exist")


def device_type_for_loading() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: ModelSpec, tokenizer=None):
    """Instantiate the model and fit its embeddings to ``tokenizer`` (new FIM sentinels get mean-initialised rows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from codetune.model.attention import resolve_attn_implementation

    spec.validate()
    attn = resolve_attn_implementation(spec.attn_implementation, device_type_for_loading())
    dtype = DTYPES[spec.dtype]
    if spec.config is not None:
        cfg = dict(spec.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        if tokenizer is not None:
            config.vocab_size = _padded(len(tokenizer), spec.pad_vocab_to_multiple_of)
        config._attn_implementation = attn
        with torch.random.fork_rng():
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            spec.name_or_path,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=spec.trust_remote_code,
            **spec.extra,
        )
    if tokenizer is not None:
        fit_embeddings(model, tokenizer, spec.pad_vocab_to_multiple_of, spec.init_seed)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    log.info("loaded %s with %s attention", spec.name_or_path or spec.config["model_type"], attn)
    return model


def fit_embeddings(model, tokenizer, multiple_of: int = 64, seed: int = 0) -> None:
    """Grow the embeddings when the tokenizer has more tokens than the model; set special token ids."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            # mean_resizing: new rows start at the mean embedding (Hewitt 2021), so the new sentinels do not
            # dominate the softmax before they are trained.
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple_of, mean_resizing=True)
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(model.config, name, value)
            if model.generation_config is not None:
                setattr(model.generation_config, name, value)


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n
