"""The one training module: causal LM over any ``AutoModelForCausalLM``. Stages subclass it and add metrics."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from codetune.model.loader import ModelSpec, load_model

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Batch keys the model itself consumes; everything else (token_kind, source_index, ...) feeds metrics.
MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")


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
        self.spec = ModelSpec(**model) if isinstance(model, dict) else model
        self.spec.validate()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = tokenizer
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"model": asdict(self.spec)})
        self.model = None

    # ---- model -----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build_model()

    def build_model(self):
        """Load the model; stages extend this (e.g. RoPE rescaling before weights are used)."""
        return load_model(self.spec, self.tokenizer)

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
            self.log(
                f"{split}/{name}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=bs,
                sync_dist=not on_step,
            )
        return loss

    def extra_metrics(
        self, batch: dict[str, torch.Tensor], losses: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Stage-specific metrics from the per-token losses; the base module adds none."""
        return {}

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self.step(batch, "test")

    # ---- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- self-contained checkpoints --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["codetune_tokenizer"] = tokenizer_files(self.tokenizer)


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer's saved files as text, so a checkpoint alone is enough to export or evaluate."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}
