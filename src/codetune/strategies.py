"""The FSDP2 training strategy: Lightning's ``ModelParallelStrategy`` set up for pure data-parallel sharding.

Recipe: ``trainer.strategy: fsdp2`` (registered with Lightning here) or ``{class_path:
codetune.strategies.FSDP2Strategy, init_args: {...}}``. The sharding itself — ``fully_shard`` per decoder layer,
then the root — is :func:`codetune.model.sharding.shard_model`, which ``CausalLM.configure_model`` calls.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from codetune.checkpoints.format import check_checkpoint_fits, checkpoint_shapes
from codetune.model.adapters import quantization_state


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
                optimizer step there (slow; for models that do not fit otherwise). The sharded model then stays
                on the CPU: FSDP2 copies each layer to the GPU when it gathers it.
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
        # on a 2-core CPU run). Each rank takes its share, on every rank; OMP_NUM_THREADS still wins when set.
        if "OMP_NUM_THREADS" not in os.environ:
            threads = threads_per_rank(self.num_processes)
            torch.set_num_threads(threads)
            os.environ["OMP_NUM_THREADS"] = str(threads)
        super().setup_environment()

    def model_to_device(self) -> None:
        # Lightning moves the whole module to the GPU after `configure_model` sharded it. With CPU offload the
        # shards must stay on the CPU (FSDP2 refuses shards elsewhere at the first forward: "FSDP parameters
        # should be materialized on CPU when enabling CPU offloading", pytorch#139110); fully_shard has already
        # put the buffers (RoPE tables) on the GPU, where the layers compute.
        if self.cpu_offload:
            return
        super().model_to_device()

    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            check_fsdp_optimizer(type(optimizer))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # The parent loads the weights straight into the shards; a checkpoint of another recipe would fail there
        # with one line per tensor, so its shapes are compared first (from the index, no weights read).
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
        # A QLoRA checkpoint also holds the 4-bit quantization state (CausalLM.on_save_checkpoint adds it).
        expected.update({key: tuple(v.shape) for key, v in quantization_state(module).items()})
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
            "codetune.strategies.FSDP2Strategy)"
        )


def threads_per_rank(local_processes: int, environ: Mapping[str, str] | None = None) -> int:
    """CPU threads for each rank: its share of the cores this process may use.

    Processes that Lightning or torchrun start on one node share one set of cores, so each takes
    ``cores // local_processes``. A SLURM task started with ``--cpus-per-task`` has its own cores already (its
    affinity is usually just them): dividing those again by the node's process count left one thread per rank.
    """
    environ = os.environ if environ is None else environ
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0 and "SLURM_PROCID" in environ:
        return max(1, min(cores, int(per_task)))
    return max(1, cores // max(1, local_processes))


def check_fsdp_optimizer(optimizer_class: type) -> None:
    """Refuse an optimizer FSDP2 cannot step: bitsandbytes' (8-bit, paged) optimizers update plain tensors and fail
    at the first step on FSDP2's sharded DTensor parameters ("got mixed torch.Tensor and DTensor")."""
    if any(cls.__module__.split(".")[0] == "bitsandbytes" for cls in optimizer_class.__mro__):
        raise ValueError(
            f"optimizer {optimizer_class.__name__} (bitsandbytes) cannot step FSDP2's sharded parameters: it fails "
            "at the first step with 'got mixed torch.Tensor and DTensor'; use codetune.optim.AdamW (under FSDP2 "
            "its states are sharded too: 1/world of the memory per rank), or a single-device/DDP strategy for "
            "the 8-bit optimizer"
        )
