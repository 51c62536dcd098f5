"""The one training module: causal LM over any ``AutoModelForCausalLM``. Stages subclass it and add metrics."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
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
from codetune.data.batch import MODEL_INPUTS
from codetune.lightning_private import evaluate_under_no_grad
from codetune.model.adapters import quantization_state
from codetune.model.build import ModelSpec, absolute_base
from codetune.model.sharding import check_shardable_quantization, shard_from_rank0, shard_model
from codetune.modules.loss import (
    DEFAULT_CHUNK_TOKENS,
    TokenLosses,
    chunked_token_losses,
    full_logits_token_losses,
)
from codetune.optim import check_training_precision
from codetune.seeding import run_seed
from codetune.strategies import check_fsdp_only, check_fsdp_optimizer, sharding_options

log = logging.getLogger(__name__)


class CausalLM(L.LightningModule):
    """Next-token prediction on packed rows; loss on ``labels`` with -100 ignored.

    Every forward passes ``use_cache=False``: with a KV cache transformers ignores the per-document
    ``position_ids`` and packed documents attend to each other.

    The loss of an optimizer step is the mean over every labelled token of the step: all its accumulated
    micro-batches on all ranks (not a mean of per-batch means, which weighs a row of 20 labels like one of 3,000).
    Each micro-batch backpropagates its loss sum; after the step's last backward :meth:`normalise_gradients`
    divides the gradients by the step's labelled tokens (summed over ranks), before callbacks, clipping and the
    optimizer see them.
    """

    wants_correct = False
    """Stages that report greedy accuracy set this: the loss then also says where argmax equals the label."""

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        tokenizer: Any = None,
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        """
        Args:
            model: Which model to fine-tune and how to load it.
            optimizer: Optimizer class and arguments (``class_path`` / ``init_args``).
            scheduler: Learning-rate schedule, stepped every optimizer step (e.g. ``codetune.optim.WarmupCosine``).
            tokenizer: Linked from the data module's tokenizer by the CLI; not set in recipes.
            loss_chunk_tokens: The output layer and cross-entropy run over the labelled positions this many at a
                time, so the full logits never exist (loss memory about ``8 x chunk x vocab`` bytes); ``0``
                computes the whole ``batch x seq_len x vocab`` logits in fp32 as a plain causal LM does.
        """
        super().__init__()
        if loss_chunk_tokens < 0:
            raise ValueError(
                f"model.init_args.loss_chunk_tokens must be >= 0 (0: full logits), got {loss_chunk_tokens}"
            )
        self.loss_chunk_tokens = loss_chunk_tokens
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
        self._step_tokens: torch.Tensor | None = (
            None  # labelled tokens of this optimizer step so far (device)
        )
        self._loss_unit: int | None = None  # constant divisor of the micro-batch sums (their gradient scale)
        self._closes_step = False  # this micro-batch's backward is the optimizer step's last

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
    def token_losses(self, batch: dict[str, torch.Tensor]) -> TokenLosses:
        """Per-token loss, its mask and their differentiable sum, aligned with ``labels[:, 1:]`` (the output at
        t-1 predicts label t); chunked over labelled positions unless ``loss_chunk_tokens`` is 0."""
        if self.loss_chunk_tokens:
            return chunked_token_losses(self.model, batch, self.loss_chunk_tokens, self.wants_correct)
        logits = self(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        return full_logits_token_losses(logits, batch["labels"], self.wants_correct)

    def step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        out = self.token_losses(batch)
        n = out.mask.sum()
        mean = out.total / n.clamp(min=1)
        bs = batch["input_ids"].shape[0]
        on_step = split == "train"
        # Epoch values (validation) are token-weighted: the mean over every labelled token, not over batches.
        self.log(
            f"{split}/loss",
            mean.detach(),
            prog_bar=True,
            on_step=on_step,
            on_epoch=not on_step,
            batch_size=bs if on_step else max(int(n), 1),
            sync_dist=not on_step,
        )
        for name, value in self.extra_metrics(batch, out).items():
            value, weight = value if isinstance(value, tuple) else (value, bs)
            if on_step:
                # Nothing of this kind in the batch. NaN, not a skip: Lightning would repeat the last step's value.
                # Decided on the device: a host sync per metric per micro-batch would stall the GPU queue.
                if torch.is_tensor(weight):
                    value = torch.where(weight > 0, torch.as_tensor(value, dtype=torch.float32), float("nan"))
                elif weight == 0:
                    value = float("nan")
                weight = bs  # a step value is not averaged: the weight is unused
            else:
                weight = int(weight)
            self.log(
                f"{split}/{name}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=weight,
                sync_dist=not on_step,
            )
        if not on_step:
            return mean
        # Training: backpropagate the sum over a constant unit; on_before_optimizer_step makes it the step's mean.
        if self._loss_unit is None:
            self._loss_unit = max(out.mask.numel(), 1)
        self._step_tokens = n if self._step_tokens is None else self._step_tokens + n
        return out.total / self._loss_unit

    def on_train_start(self) -> None:
        self._step_tokens, self._loss_unit = None, None

    def on_after_backward(self) -> None:
        # The last micro-batch of an optimizer step: normalise now, so every on_before_optimizer_step callback
        # (StepStats' grad_norm) and clipping already see the step's gradient.
        if self._closes_step:
            self.normalise_gradients()

    def on_before_optimizer_step(self, optimizer) -> None:
        self.normalise_gradients()  # a window on_after_backward did not recognise as closing (iterable data)

    def normalise_gradients(self) -> None:
        """Divide the accumulated gradients by the step's labelled tokens (all micro-batches, all ranks).

        Lightning divided each micro-batch's loss by ``accumulate_grad_batches`` and DDP/FSDP2 average gradients
        over ranks, so the factor is ``accumulate x world x unit / tokens``. One all-reduce of a scalar per
        optimizer step; no host sync (the factor stays on the device). Does nothing twice for one step.
        """
        tokens, self._step_tokens = self._step_tokens, None
        if tokens is None or self._trainer is None:
            return
        trainer = self.trainer
        tokens = tokens.float()
        if trainer.world_size > 1:
            tokens = trainer.strategy.reduce(tokens, reduce_op="sum")
        factor = trainer.accumulate_grad_batches * trainer.world_size * self._loss_unit / tokens.clamp(min=1)
        with torch.no_grad():
            for param in self.parameters():
                grad = param.grad
                if grad is None:
                    continue
                local = grad.to_local() if hasattr(grad, "to_local") else grad  # FSDP2: this rank's shard
                local.mul_(factor.to(local.device))

    def extra_metrics(
        self, batch: dict[str, torch.Tensor], out: TokenLosses
    ) -> dict[str, torch.Tensor | tuple[torch.Tensor, int | torch.Tensor]]:
        """Stage-specific metrics from the per-token losses (``out``); the base module adds none.

        A value may come as ``(value, weight)``: epoch averages then weight it by ``weight`` (e.g. the number of
        tokens it was measured on) instead of the batch size. A weight of 0 means "not measured here": it adds
        nothing to an epoch average (the value must then be finite, e.g. 0) and logs NaN as a step value.
        """
        return {}

    def training_step(self, batch, batch_idx):
        trainer = self._trainer
        if trainer is not None:
            # Lightning steps the optimizer after every accumulate_grad_batches-th batch and after the epoch's last.
            done = batch_idx + 1
            self._closes_step = (
                done % trainer.accumulate_grad_batches == 0 or done == trainer.num_training_batches
            )
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
