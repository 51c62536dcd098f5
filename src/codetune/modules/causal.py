"""The one training module: causal LM over any ``AutoModelForCausalLM``. Stages subclass it and add metrics."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy

from codetune.checkpoints.format import (
    MODEL_HPARAM,
    add_tokenizer,
    check_checkpoint_fits,
    hyperparameters,
    quantized_keys,
)
from codetune.checkpoints.integrity import (
    NonFiniteError,
    add_checksums,
    already_verified,
    mark_verified,
    non_finite,
    verify_checksums,
)
from codetune.checkpoints.locate import is_training_checkpoint
from codetune.checkpoints.trained import build_training_model
from codetune.data.batch import IGNORE_INDEX, MODEL_INPUTS
from codetune.lightning_private import evaluate_under_no_grad
from codetune.model.adapters import quantization_state
from codetune.model.build import ModelSpec, absolute_base
from codetune.model.sharding import check_shardable_quantization, shard_from_rank0, shard_model
from codetune.optim import check_training_precision
from codetune.seeding import run_seed
from codetune.strategies import check_fsdp_only, check_fsdp_optimizer, sharding_options

log = logging.getLogger(__name__)


class CausalLM(L.LightningModule):
    """Next-token prediction on packed rows; loss on ``labels`` with -100 ignored.

    Every forward passes ``use_cache=False``: with a KV cache transformers ignores the per-document
    ``position_ids`` and packed documents attend to each other.
    """

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        tokenizer: Any = None,
    ) -> None:
        """
        Args:
            model: Which model to fine-tune and how to load it.
            optimizer: Optimizer class and arguments (``class_path`` / ``init_args``).
            scheduler: Learning-rate schedule, stepped every optimizer step (e.g. ``codetune.optim.WarmupCosine``).
            tokenizer: Linked from the data module's tokenizer by the CLI; not set in recipes.
        """
        super().__init__()
        spec = ModelSpec(**model) if isinstance(model, dict) else model
        # The seed that initialised this run is recorded, so a rebuild (export, eval) initialises identically; so is
        # the base as an absolute path, so the run's checkpoint works from any directory (issue 14 #2).
        self.spec = replace(
            spec, init_seed=run_seed(spec.init_seed), name_or_path=absolute_base(spec.name_or_path)
        )
        self.spec.validate()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = tokenizer
        self.save_hyperparameters(hyperparameters(self.spec))
        self.model = None

    # ---- model -----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        strategy = self._trainer.strategy if self._trainer is not None else None
        sharded = isinstance(strategy, ModelParallelStrategy)
        if sharded:
            check_fsdp_only(strategy)
            check_shardable_quantization(self.spec.quantization)  # before any weight is read
            # Lightning would validate under inference mode, which breaks FSDP2's next unshard (see there).
            evaluate_under_no_grad(self.trainer)
        # Under FSDP2 only rank 0 loads the weights; the others build the model on the meta device and receive
        # their shards (a 4-bit base is quantized while loading, and a continued run is rebuilt from its
        # checkpoint: both still load on every rank).
        from_rank0 = (
            sharded
            and self.model is None
            and strategy.world_size > 1
            and self.spec.quantization is None
            and not is_training_checkpoint(self.spec.name_or_path)
        )
        if self.model is None:
            self._build_on_meta = from_rank0 and strategy.global_rank != 0
            # from_pretrained returns a model in eval mode; Lightning keeps modes as it finds them, so dropout
            # (LoRA dropout included) would silently stay off during training.
            self.model = self.build_model().train()
        if sharded:
            # FSDP2: shard each decoder layer, then the root, before Lightning builds the optimizer on the shards.
            shard = shard_from_rank0 if from_rank0 else shard_model
            shard(
                self.model,
                strategy.device_mesh["data_parallel"],
                precision=str(self.trainer.precision),
                **sharding_options(strategy),
            )

    def build_model(self):
        """Load the model (or continue a codetune run's); stages extend this (e.g. to log what was built)."""
        model = build_training_model(self.spec, self.tokenizer, meta=getattr(self, "_build_on_meta", False))
        self.record_hub_revision(model)
        return model

    def record_hub_revision(self, model) -> None:
        """Pin a Hub base to the commit it was loaded from (unless the recipe pinned one), in the spec and the
        checkpoint's hyperparameters: a later export or eval rebuilds from the same weights, not a newer push."""
        name = self.spec.name_or_path
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
        if not name or Path(name).expanduser().exists() or "revision" in self.spec.extra or not commit:
            return
        self.spec.extra["revision"] = commit
        self.hparams[MODEL_HPARAM]["extra"]["revision"] = commit

    def forward(self, input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).logits

    # ---- loss ------------------------------------------------------------------------------------
    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token loss and its mask, aligned with ``labels[:, 1:]`` (logits at t-1 predict label t)."""
        logits = self(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view_as(targets)
        return losses, targets != IGNORE_INDEX, logits

    def step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        losses, mask, logits = self.token_losses(batch)
        n = mask.sum()
        loss = losses.sum() / n.clamp(min=1)
        bs = batch["input_ids"].shape[0]
        on_step = split == "train"
        self.log(
            f"{split}/loss",
            loss,
            prog_bar=True,
            on_step=on_step,
            on_epoch=not on_step,
            batch_size=bs,
            sync_dist=not on_step,
        )
        for name, value in self.extra_metrics(batch, losses, mask, logits).items():
            value, weight = value if isinstance(value, tuple) else (value, bs)
            weight = int(weight)
            if on_step and weight == 0:
                # Nothing of this kind in the batch. NaN, not a skip: Lightning would repeat the last step's value.
                value, weight = float("nan"), 1
            self.log(
                f"{split}/{name}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=weight,
                sync_dist=not on_step,
            )
        return loss

    def extra_metrics(
        self, batch: dict[str, torch.Tensor], losses: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor
    ) -> dict[str, torch.Tensor | tuple[torch.Tensor, int | torch.Tensor]]:
        """Stage-specific metrics from the per-token losses; the base module adds none.

        A value may come as ``(value, weight)``: epoch averages then weight it by ``weight`` (e.g. the number of
        tokens it was measured on) instead of the batch size. A weight of 0 means "not measured here": it adds
        nothing to an epoch average (the value must then be finite, e.g. 0) and logs NaN as a step value.
        """
        return {}

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self.step(batch, "test")

    # ---- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        trainer = self._trainer
        if trainer is not None:
            check_training_precision(trainer.precision)
        optimizer = self.optimizer_factory(parameter_groups(self))
        if trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy):
            check_fsdp_optimizer(type(optimizer))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- self-contained checkpoints --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            add_tokenizer(checkpoint, self.tokenizer)
        # Under FSDP2 the 4-bit weights lose their quantization state from the state dict (see
        # quantization_state); without it the checkpoint would not be recognised as QLoRA by export and eval.
        state = checkpoint.get("state_dict", {})
        if "state_dict" in checkpoint:
            for key, value in quantization_state(self).items():
                state.setdefault(key, value)
        # Never write NaN weights (the run's guard stops training first; this also covers a save from elsewhere):
        # a checkpoint that exists must be one worth resuming from. Packed 4-bit weights are bytes, not floats,
        # whatever dtype stores them.
        packed = quantized_keys(state)
        broken = non_finite({k: v for k, v in state.items() if k not in packed})
        if broken:
            raise NonFiniteError(
                f"step {checkpoint.get('global_step')}: not saving a checkpoint, {len(broken)} weights hold NaN or "
                f"infinite values ({', '.join(broken[:2])}); the checkpoints already written are untouched"
            )
        add_checksums(checkpoint)  # last: it covers every tensor the checkpoint holds

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        where = trainer.ckpt_path if trainer is not None else "checkpoint"
        if not already_verified(where):  # the CLI verifies --ckpt_path before the data is built
            verify_checksums(checkpoint, where)
            mark_verified(where)
        # A checkpoint of another recipe fails here in one line rather than a page of "size mismatch" lines.
        # (Under FSDP2 the strategy has loaded the shards already, after the same check.)
        if trainer is None or self.model is None or "state_dict" not in checkpoint:
            return
        if not isinstance(trainer.strategy, ModelParallelStrategy):
            check_checkpoint_fits(
                {k: tuple(v.shape) for k, v in self.state_dict().items()},
                {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")},
                trainer.ckpt_path,
                strict=self.strict_loading,
            )


def parameter_groups(module: torch.nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters in two optimizer groups: matrices (linear, embedding and LoRA weights) with the
    optimizer's weight decay, and 1-D parameters (biases, norm gains, DoRA magnitudes) without it, as nanoGPT and
    the HF Trainer do: decaying a gain or a bias towards 0 only fights the normalisation it scales."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2]},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def masked_mean(values: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` over ``selected`` and how many were selected: an ``extra_metrics`` value with its weight."""
    count = selected.sum()
    return (values * selected).sum() / count.clamp(min=1), count
