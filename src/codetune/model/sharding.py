"""FSDP2 for any Hugging Face causal LM: ``fully_shard`` each decoder layer, then the root.

The Lightning side is :class:`codetune.strategies.FSDP2Strategy` (recipe: ``trainer.strategy: fsdp2``);
``CausalLM.configure_model`` calls :func:`shard_model` once the model is built. Per-layer sharding is what makes FSDP save memory: each decoder layer
is all-gathered just before it runs and freed after, so a rank holds its 1/world of every weight, gradient and
optimizer state plus one full layer at a time. The root group holds what is left (embeddings, final norm, output
head — a tied head shares the embedding's parameter, so both stay in one group).

FSDP2 shards each parameter on its own (no flattening), so a QLoRA model — frozen 4-bit weights stored as
bfloat16 next to float32 LoRA matrices — shards as it is. Host memory: :func:`shard_from_rank0` lets only rank
0 hold the loaded model; every other rank builds it on the meta device and receives its shards. Activation checkpointing is the model's own per-layer
checkpointing (``model.gradient_checkpointing``): transformers checkpoints each layer's ``forward`` and leaves
FSDP2's hooks outside it, so the recompute does not gather the layer twice.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from codetune.model.rope import remember_rotary_tables

log = logging.getLogger(__name__)

# Trainer precision -> FSDP2 mixed precision. bf16-mixed keeps the float32 master weights sharded and gathers
# them in bf16 for compute; gradients are reduced in float32 so the average over ranks does not lose bits.
# bf16-true needs no policy: Lightning casts the whole module to bf16.
_MIXED = {"bf16-mixed": torch.bfloat16}
_UNSUPPORTED = {
    "16-mixed": "float16 needs a sharded gradient scaler that codetune does not set up; use bf16-mixed",
    "16-true": "pure float16 training diverges without loss scaling; use bf16-true or bf16-mixed",
}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks, in order.

    Found by the class names a Hugging Face model lists in ``_no_split_modules`` (the blocks that must stay on one
    device, i.e. the layers), else as the longest ``ModuleList`` of one block type (``model.layers``,
    ``transformer.h``). Works through a peft wrapper.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    if not lists:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__} to shard: it lists no _no_split_modules and "
            "has no ModuleList of repeated blocks"
        )
    return list(max(lists, key=len))


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for a Trainer ``precision`` (``None`` when no policy is needed)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    precision = str(precision)
    if precision in _UNSUPPORTED:
        raise ValueError(f"trainer.precision={precision} with FSDP2: {_UNSUPPORTED[precision]}")
    if precision in _MIXED:
        return MixedPrecisionPolicy(param_dtype=_MIXED[precision], reduce_dtype=torch.float32)
    return None


def shard_model(
    model: nn.Module,
    mesh: Any,
    precision: str = "32-true",
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Apply FSDP2 in place: ``fully_shard`` on each decoder layer, then on the root. Returns ``model``.

    ``mesh`` is the one-dimensional data-parallel device mesh (``strategy.device_mesh["data_parallel"]``).
    Idempotent: a model already sharded is returned unchanged (``configure_model`` runs again for
    ``trainer.validate`` after ``fit``).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return model
    check_quantized_storage(model)
    policy = mixed_precision_policy(precision) or MixedPrecisionPolicy()
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": policy}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    # Every group alike: a layer left gathered after its forward (a common trick for the last one) would stay
    # gathered through validation, which has no backward to reshard it.
    for layer in layers:
        if compile:
            layer.compile()  # in place: no `_orig_mod.` in parameter names, checkpoints stay interchangeable
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    log.info(
        "FSDP2: %d %s layers + root sharded over %d ranks (precision %s%s%s)",
        len(layers),
        type(layers[0]).__name__,
        mesh.size(),
        precision,
        ", CPU offload" if cpu_offload else "",
        ", compiled layers" if compile else "",
    )
    return model


def check_shardable_quantization(quantization: Any) -> None:
    """Refuse, before anything is loaded, a ``model.quantization`` that FSDP2 cannot shard (the recipe check;
    :func:`check_quantized_storage` checks the built layers)."""
    if quantization is None:
        return
    if quantization.bits == 8:
        raise ValueError(
            "model.quantization.bits=8 (LLM.int8) cannot be sharded with FSDP2: its layers keep state FSDP2 does "
            "not shard; use bits: 4 with quant_storage: bfloat16, or a single-device/DDP strategy"
        )
    if quantization.quant_storage != "bfloat16":
        raise ValueError(
            f"model.quantization.quant_storage={quantization.quant_storage} cannot be sharded with FSDP2: FSDP2 "
            "treats the packed 4-bit bytes as numbers of that dtype (with uint8 training crashes or reports loss "
            "0 with NaN gradient norms, accelerate#3983); set model.quantization.quant_storage: bfloat16"
        )


def shard_from_rank0(model: nn.Module, mesh: Any, **options: Any) -> nn.Module:
    """Shard a model only rank 0 has loaded: :func:`shard_model` on every rank, then rank 0's weights and buffers
    are sent to the others, each rank keeping its shards.

    On rank 0 ``model`` is the loaded model; on every other rank the same model built on the meta device (no
    memory). A rank other than 0 then holds, at its peak, its shards plus one full tensor in flight, instead of a
    whole copy of the model (torchtitan's and torchtune's ``broadcast_from_rank0`` loading). Rank 0 holds the
    full model until its shards are sent. Buffers (RoPE tables) are not sharded: each rank gets rank 0's.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    group = mesh.get_group()
    rank0 = dist.get_rank(group) == 0
    full = model.state_dict() if rank0 else {}
    shard_model(model, mesh, **options)
    if not rank0:
        device = torch.device("cpu") if options.get("cpu_offload") or mesh.device_type == "cpu" else None
        if device is None:
            device = torch.device(mesh.device_type, torch.cuda.current_device())
        model.to_empty(device=device)
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )
    del full
    for _, buffer in sorted(model.named_buffers(), key=lambda item: item[0]):
        dist.broadcast(buffer.data, src=dist.get_global_rank(group, 0), group=group)
    remember_rotary_tables(model)  # the received float32 tables, kept through a later bf16 cast
    return model


def check_quantized_storage(model: nn.Module) -> None:
    """A bitsandbytes 4-bit base shards only when its packed weights are stored as bfloat16 (QLoRA's
    ``quant_storage``): FSDP2 casts floating parameters to the compute dtype, which would garble packed bytes
    stored in any other float dtype, and 8-bit layers keep state FSDP2 does not shard."""
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind.startswith("Linear8bit"):
            raise ValueError(
                f"{name}: 8-bit (LLM.int8) layers cannot be sharded with FSDP2; use model.quantization.bits: 4 "
                "with quant_storage: bfloat16, or a single-device/DDP strategy"
            )
        if kind == "Linear4bit" and module.weight.dtype != torch.bfloat16:
            raise ValueError(
                f"{name}: 4-bit weights stored as {module.weight.dtype} cannot be sharded with FSDP2; set "
                "model.quantization.quant_storage: bfloat16 (QLoRA + FSDP needs the packed weights in the "
                "compute dtype)"
            )
