"""FSDP2 for any Hugging Face causal LM: ``fully_shard`` each decoder layer, then the root.

Recipe: ``trainer.strategy: {class_path: codetune.model.sharding.FSDP2Strategy}`` (or Lightning's own
``ModelParallelStrategy`` with ``tensor_parallel_size: 1``). ``CausalLM.configure_model`` calls
:func:`shard_model` once the model is built. Per-layer sharding is what makes FSDP save memory: each decoder layer
is all-gathered just before it runs and freed after, so a rank holds its 1/world of every weight, gradient and
optimizer state plus one full layer at a time. The root group holds what is left (embeddings, final norm, output
head — a tied head shares the embedding's parameter, so both stay in one group).

FSDP2 shards each parameter on its own (no flattening), so a QLoRA model — frozen 4-bit weights stored as
bfloat16 next to float32 LoRA matrices — shards as it is. Activation checkpointing is the model's own per-layer
checkpointing (``model.gradient_checkpointing``): transformers checkpoints each layer's ``forward`` and leaves
FSDP2's hooks outside it, so the recompute does not gather the layer twice.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

log = logging.getLogger(__name__)

# Trainer precision -> FSDP2 mixed precision. bf16-mixed keeps the float32 master weights sharded and gathers
# them in bf16 for compute; gradients are reduced in float32 so the average over ranks does not lose bits.
# bf16-true needs no policy: Lightning casts the whole module to bf16.
_MIXED = {"bf16-mixed": torch.bfloat16}
_UNSUPPORTED = {
    "16-mixed": "float16 needs a sharded gradient scaler that codetune does not set up; use bf16-mixed",
    "16-true": "pure float16 training diverges without loss scaling; use bf16-true or bf16-mixed",
}


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` set up for pure FSDP2: every process is one data-parallel shard.

    Lightning's own defaults build a 2-D mesh (data parallel across nodes, tensor parallel within a node) that
    needs tensor-parallel plans codetune does not write; here the data-parallel size is the whole world
    (all devices of all nodes) and tensor parallelism is off.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        compile: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            reshard_after_forward: Free each layer's gathered weights after its forward and gather them again for
                the backward (ZeRO-3, least memory). ``false`` keeps them until the backward (ZeRO-2-like,
                less communication, a full copy of the weights per rank at peak).
            cpu_offload: Keep sharded parameters, gradients and optimizer states in CPU memory and run the
                optimizer step there (slow; for models that do not fit otherwise).
            compile: ``torch.compile`` each decoder layer before sharding it (one graph per layer type, compiled
                once; parameter names and checkpoints are unchanged). The first steps pay the compilation.
            save_distributed_checkpoint: Each rank writes its own shard (a checkpoint folder, fast, no full copy
                anywhere). ``false`` gathers a single ``.ckpt`` file on rank 0 (needs the full state in its memory).
            process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPU by default.
            timeout: How long a collective may wait for the slowest rank before the run fails.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.compile = compile

    def setup_environment(self) -> None:
        # "auto" in the parent means "number of nodes"; pure FSDP shards over every process instead.
        self._data_parallel_size = self.num_nodes * self.num_processes
        # Lightning divides the cores between the processes of a node only in the process that launches the
        # others; every other rank would run one thread per core and oversubscribe them (10x slower QLoRA steps
        # on a 2-core CPU run). Same division, on every rank; OMP_NUM_THREADS still wins when set.
        _set_num_threads_if_needed(num_processes=self.num_processes)
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # The parent loads the weights straight into the shards; a checkpoint of another recipe would fail there
        # with one line per tensor, so its shapes are compared first (from the index, no weights read).
        from codetune.resume import check_checkpoint_fits, checkpoint_shapes

        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
        check_checkpoint_fits(
            expected, checkpoint_shapes(path), checkpoint_path, strict=module.strict_loading
        )
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


StrategyRegistry.register(
    "fsdp2",
    FSDP2Strategy,
    description="FSDP2 (fully_shard per decoder layer) over all devices",
    override=True,
)


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


def sharding_options(strategy: Any) -> dict[str, Any]:
    """:func:`shard_model` options from an :class:`FSDP2Strategy`; defaults for Lightning's own strategy."""
    return {
        "reshard_after_forward": getattr(strategy, "reshard_after_forward", True),
        "cpu_offload": getattr(strategy, "cpu_offload", False),
        "compile": getattr(strategy, "compile", False),
    }


def check_fsdp_only(strategy: ModelParallelStrategy) -> None:
    """codetune applies FSDP2 and no tensor-parallel plan: a tensor-parallel mesh dimension would be ignored."""
    tp = strategy.device_mesh["tensor_parallel"].size()
    if tp != 1:
        raise ValueError(
            f"ModelParallelStrategy(tensor_parallel_size={tp}): codetune shards with FSDP2 only; set "
            "tensor_parallel_size: 1 and data_parallel_size to the number of processes (or use "
            "codetune.model.sharding.FSDP2Strategy)"
        )
