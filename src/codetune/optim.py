"""Learning-rate schedules (and, with the models issue, optimizers beyond torch's)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` × peak.

    Code Llama: 1000 warm-up steps and a floor of 1/30 of the peak. ``total_steps`` defaults to the
    Trainer's ``estimated_stepping_batches`` (the module fills it in), so recipes rarely set it.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1 / 30,
        total_steps: int | None = None,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.total_steps = total_steps
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        total = self.total_steps or step + 1
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupLinear(WarmupCosine):
    """Linear warm-up, then linear decay to ``min_lr_ratio`` × peak (0 by default)."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        total_steps: int | None = None,
    ) -> None:
        super().__init__(optimizer, warmup_steps, min_lr_ratio, total_steps)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        total = self.total_steps or step + 1
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 - progress)
