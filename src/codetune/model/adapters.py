"""How the weights train: full fine-tuning, LoRA, DoRA, and QLoRA / 8-bit bases (recipe: ``model.adapter``,
``model.quantization``).

LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) come from peft, the 4-bit NF4 and 8-bit bases from
bitsandbytes (QLoRA, Dettmers et al. 2023). Tokens the tokenizer adds to a base (FIM sentinels) have no trained
embedding, so under an adapter their rows of the input embedding and of an untied output head train too (peft's
``trainable_token_indices``), and nothing else outside the adapter does. The result stays a standard
``PeftModelForCausalLM``, whose state dict export can merge into a full-precision base.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from codetune.errors import first_line

log = logging.getLogger(__name__)

# Attention and MLP projections of each family: what `target_modules: auto` adapts (QLoRA adapts every linear
# layer of the blocks, Dettmers et al. §4). Families not listed get every linear layer of their blocks.
_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_STYLE,  # Llama, Code Llama, DeepSeek-Coder 1.x
    "mistral": _LLAMA_STYLE,  # Mistral, Codestral
    "qwen2": _LLAMA_STYLE,  # Qwen2.5-Coder
    "qwen3": _LLAMA_STYLE,
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
    # StarCoder 1 / SantaCoder: multi-query attention with a fused q+kv `c_attn`; `c_proj` is in both halves.
    "gpt_bigcode": ("c_attn", "c_proj", "c_fc"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORAGE = {"uint8": torch.uint8, **DTYPES}


@dataclass
class Adapter:
    """Which weights train (recipe: ``model.adapter``)."""

    method: Literal["full", "lora", "dora"] = "full"
    """``full``: every weight trains. ``lora``: low-rank adapters on ``target_modules``, the base is frozen.
    ``dora``: LoRA plus a trained per-column magnitude (weight-decomposed LoRA)."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the LoRA input (0 disables it; ``EarlyDropout`` can only decay a nonzero rate)."""
    target_modules: str | list[str] = "auto"
    """``auto`` (the family's attention and MLP projections, see ``FAMILY_TARGETS``), ``all-linear`` (every
    linear layer but the output head), or module names such as ``[q_proj, v_proj]``."""
    train_new_tokens: bool = True
    """Train the embedding rows (and untied output-head rows) of tokens the tokenizer added to the base."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapter (e.g. ``[lm_head]``); their rows are then not adapted
    separately."""

    def validate(self) -> None:
        if self.method not in ("full", "lora", "dora"):
            raise ValueError(f"adapter.method={self.method!r} is unknown: use full, lora or dora")
        if self.method == "full":
            return
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"adapter.r={self.r!r} must be a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"adapter.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.target_modules, str):
            if self.target_modules not in ("auto", "all-linear"):
                raise ValueError(
                    f"adapter.target_modules={self.target_modules!r}: use auto, all-linear or a list of "
                    "module names"
                )
        elif not self.target_modules:
            raise ValueError(
                "adapter.target_modules is empty: use auto, all-linear or a list of module names"
            )


@dataclass
class Quantization:
    """Load the frozen base quantized by bitsandbytes (recipe: ``model.quantization``); needs a LoRA/DoRA adapter."""

    bits: Literal[4, 8] = 4
    """4: QLoRA (NF4 or FP4 blocks). 8: LLM.int8() linear layers."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 is QLoRA's normal-float code."""
    double_quant: bool = True
    """Quantize the block scales too (QLoRA's double quantization, ~0.4 bit per weight saved)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for each matmul."""
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """Dtype the packed 4-bit weights are stored in. FSDP flattens parameters of one dtype together: set it to
    the dtype of the other parameters (e.g. ``bfloat16``) to shard a QLoRA model."""

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"quantization.bits={self.bits!r} must be 4 or 8")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quantization.quant_type={self.quant_type!r} must be nf4 or fp4")
        if self.compute_dtype not in DTYPES:
            raise ValueError(
                f"quantization.compute_dtype={self.compute_dtype!r}: use one of {sorted(DTYPES)}"
            )
        if self.quant_storage not in _STORAGE:
            raise ValueError(
                f"quantization.quant_storage={self.quant_storage!r}: use one of {sorted(_STORAGE)}"
            )


def bnb_config(quantization: Quantization):
    """The ``transformers.BitsAndBytesConfig`` a quantized base is loaded with."""
    from transformers import BitsAndBytesConfig

    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quantization.compute_dtype],
        bnb_4bit_quant_storage=_STORAGE[quantization.quant_storage],
    )


def check_quantization_supported(quantization: Quantization, device: str | torch.device) -> None:
    """Quantize a small linear layer on ``device`` the way the model's will be and run it, so an unsupported
    device or a missing bitsandbytes is one clear error before any weight is loaded."""
    device = torch.device(device)
    try:
        import bitsandbytes as bnb
    except Exception as error:  # ImportError, or a broken native library
        raise ValueError(
            f"model.quantization needs bitsandbytes, which cannot be imported ({error}); install it "
            "(pip install bitsandbytes) or remove model.quantization"
        ) from None
    kind = f"4-bit {quantization.quant_type}" if quantization.bits == 4 else "8-bit int8"
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=generator) / 8
    x = torch.randn(4, 64, generator=generator)
    try:
        if quantization.bits == 4:
            layer = bnb.nn.Linear4bit(
                64,
                64,
                bias=False,
                compute_dtype=DTYPES[quantization.compute_dtype],
                compress_statistics=quantization.double_quant,
                quant_type=quantization.quant_type,
                quant_storage=_STORAGE[quantization.quant_storage],
            )
            layer.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=quantization.double_quant,
                quant_type=quantization.quant_type,
                quant_storage=_STORAGE[quantization.quant_storage],
            )
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer = layer.to(device)  # bitsandbytes quantizes on the move to the device
        with torch.no_grad():
            out = (
                layer(x.to(device, torch.float16 if quantization.bits == 8 else torch.float32)).float().cpu()
            )
        error = ((out - x @ weight.T).norm() / (x @ weight.T).norm()).item()
        if not error < 0.5:  # NF4 is ~0.1 here, int8 ~0.01
            raise RuntimeError(f"a quantized test layer is off by {error:.0%}")
    except Exception as error:
        message = first_line(error)
        raise ValueError(
            f"bitsandbytes cannot run {kind} layers on device {device.type!r} ({message}); use a CUDA GPU, or "
            "CPU with bitsandbytes >= 0.48, or remove model.quantization"
        ) from None


def keep_4bit_layers_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns how many layers it touched.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a ``Linear4bit`` weight in place to an inference-only
    layout the first time the layer runs in eval mode (a validation pass), and from then on routes training
    forwards through a kernel with no autograd: gradients through the frozen base are silently dropped.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def quantization_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The 4-bit quantization state a sharded model's ``state_dict`` no longer holds, under the keys bitsandbytes
    writes (``<layer>.weight.absmax``, ``.quant_map``, ``.nested_absmax``, ``.quant_state.bitsandbytes__nf4``...).

    ``fully_shard`` replaces each ``Params4bit`` weight by a DTensor shard without ``quant_state``, so
    ``Linear4bit`` saves none of it and a checkpoint written under FSDP2 could not be recognised as QLoRA (export
    and evaluation failed on the packed weights' shapes). The layer keeps the state itself (bitsandbytes restores
    the weight's from it at every forward), whole on every rank; it is returned here as CPU tensors. Empty for a
    model without 4-bit layers or whose weights still carry their state (they save it themselves).
    """
    if not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        return {}
    import bitsandbytes as bnb

    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if (
            not isinstance(module, bnb.nn.Linear4bit)
            or getattr(module.weight, "quant_state", None) is not None
        ):
            continue
        quant_state = getattr(module, "quant_state", None)
        if quant_state is None:
            continue
        prefix = f"{name}.weight." if name else "weight."
        for key, value in quant_state.as_dict(packed=True).items():
            state[prefix + key] = value.detach().cpu()
    return state


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the model's linear layers (``q_proj``, ``c_attn``, ``lm_head``, ...), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in _linear_modules(model)})


def resolve_target_modules(model: torch.nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """The module names LoRA wraps: the family's projections for ``auto``, every block linear layer for
    ``all-linear``, or the given names after checking each matches a linear layer of the model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    block_linear = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in _linear_modules(model)
            if not _is_output_head(model, module)
        }
    )
    if target_modules == "all-linear" or (target_modules == "auto" and model_type not in FAMILY_TARGETS):
        if target_modules == "auto":
            log.info("no LoRA target table for model type %r: adapting every linear layer", model_type)
        return block_linear
    names = list(FAMILY_TARGETS[model_type]) if target_modules == "auto" else list(target_modules)
    full_names = [name for name, _ in _linear_modules(model)]
    unknown = [t for t in names if not any(n == t or n.endswith("." + t) for n in full_names)]
    if unknown:
        where = "the family table" if target_modules == "auto" else "adapter.target_modules"
        raise ValueError(
            f"{where} names {unknown}, which match no linear layer of this {model_type or 'model'}; "
            f"its linear modules are {linear_module_names(model)} (or use target_modules: all-linear)"
        )
    return names


def trainable_token_indices(
    model: torch.nn.Module, token_ids: Sequence[int], modules_to_save: Sequence[str] = ()
) -> dict[str, list[int]]:
    """peft's dict form of ``trainable_token_indices``: the input embedding, and the output head when it is a
    separate matrix (peft's list form would leave an untied head frozen). A tied head shares the rows."""
    ids = sorted(set(int(i) for i in token_ids))
    if not ids:
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    layers = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not layers[0].weight:
        layers.append(output)
    result = {}
    for layer in layers:
        name = names[id(layer)]
        if any(name == m or name.endswith("." + m) for m in modules_to_save):
            continue  # trained in full already
        result[name] = ids
    return result


def apply_adapter(
    model: torch.nn.Module,
    adapter: Adapter,
    new_token_ids: Sequence[int] = (),
    quantized: bool = False,
) -> torch.nn.Module:
    """Freeze the base and attach the adapter (a no-op for full fine-tuning). Returns the model to train.

    ``new_token_ids`` are rows the tokenizer added to the base; they train under LoRA/DoRA when
    ``adapter.train_new_tokens``. ``quantized`` bases first get peft's k-bit preparation (norms and other
    half-precision parameters upcast to float32 for stable training).
    """
    if adapter.method == "full":
        if quantized:
            raise ValueError(
                "model.quantization freezes the base in 4/8 bit, so adapter.method=full cannot train it: "
                "use adapter.method lora or dora (QLoRA), or remove model.quantization"
            )
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = resolve_target_modules(model, adapter.target_modules)
    tokens = (
        trainable_token_indices(model, new_token_ids, adapter.modules_to_save)
        if adapter.train_new_tokens
        else {}
    )
    if quantized:
        # Gradient checkpointing, if asked for, is already on (non-reentrant, so inputs need no grad).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        use_dora=adapter.method == "dora",
        trainable_token_indices=tokens or None,
        modules_to_save=list(adapter.modules_to_save) or None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    rows = f", rows of {len(new_token_ids)} new tokens in {list(tokens)}" if tokens else ""
    log.info(
        "%s on %s (r=%d, alpha=%g)%s: %d of %d parameters train",
        adapter.method,
        targets,
        adapter.r,
        adapter.alpha,
        rows,
        trainable,
        total,
    )
    return peft_model


def _linear_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear, so quantized bases are covered.
    return [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def _is_output_head(model: torch.nn.Module, module: torch.nn.Module) -> bool:
    get_output = getattr(model, "get_output_embeddings", None)
    return get_output is not None and get_output() is module
