"""Optimizers beyond torch's (Lion, bitsandbytes' paged 8-bit AdamW, AdamW fused on CUDA) and LR schedules.

Recipes name them as ``class_path: codetune.optim.Lion`` (or ``AdamW``, ``PagedAdamW8bit``) under
``model.init_args.optimizer``; the module passes only the trainable parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that takes the fused CUDA kernel when every parameter is on a GPU.

    torch's own default is the multi-tensor (``foreach``) path; the fused kernel is one launch per step. Defaults
    are Code Llama's (β = (0.9, 0.95), weight decay 0.1).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        fused: bool | None = None,
    ) -> None:
        """
        Args:
            params: Parameters (or parameter groups) to optimize.
            lr: Peak learning rate.
            betas: Decay rates of the first and second moment estimates.
            eps: Added to the denominator for numerical stability.
            weight_decay: Decoupled weight decay.
            fused: Use the fused kernel; ``None`` decides by device (fused when every parameter is on CUDA).
        """
        params = list(params)
        if fused is None:
            fused = wants_fused(params)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)


def wants_fused(params: list) -> bool:
    """True when every parameter is a floating-point CUDA tensor (what the fused AdamW kernel takes)."""
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    return bool(tensors) and all(t.device.type == "cuda" and t.is_floating_point() for t in tensors)


class Lion(Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an interpolated
    momentum, so every coordinate moves by exactly ``lr`` (one state tensor instead of AdamW's two).

    ``update = sign(β1·m + (1-β1)·g)``; ``p ← p·(1 - lr·wd) - lr·update``; ``m ← β2·m + (1-β2)·g``.
    Take an ``lr`` 3-10× smaller and a ``weight_decay`` 3-10× larger than for AdamW.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        """
        Args:
            params: Parameters (or parameter groups) to optimize.
            lr: Learning rate (the size of every coordinate's step).
            betas: β1 interpolates the update direction, β2 is the momentum's decay.
            weight_decay: Decoupled weight decay, applied as ``p·(1 - lr·wd)``.
        """
        if not lr > 0:
            raise ValueError(f"optimizer.lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"optimizer.betas must be two values in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                momentum = state["exp_avg"]
                if wd:
                    p.mul_(1 - lr * wd)
                update = momentum.lerp(p.grad, 1 - beta1).sign_()
                p.add_(update, alpha=-lr)
                momentum.lerp_(p.grad, 1 - beta2)
        return loss


def __getattr__(name: str):
    # bitsandbytes takes ~2 s to import and logs about optional kernels, so its optimizer is only built when a
    # recipe names it (PEP 562 module attribute).
    if name == "PagedAdamW8bit":
        globals()[name] = _paged_adamw_8bit_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _paged_adamw_8bit_class() -> type[Optimizer]:
    try:
        import bitsandbytes as bnb
    except Exception as error:
        raise ImportError(
            f"codetune.optim.PagedAdamW8bit needs bitsandbytes, which cannot be imported ({error}); install it "
            "or use codetune.optim.AdamW"
        ) from None

    class PagedAdamW8bit(bnb.optim.PagedAdamW8bit):
        """bitsandbytes' paged AdamW with 8-bit block-quantized moments (Dettmers et al. 2022; QLoRA's optimizer).

        The moments take a quarter of AdamW's memory, and on CUDA they live in unified memory that is paged to
        the CPU under memory pressure instead of failing with out-of-memory. Tensors smaller than
        ``min_8bit_size`` keep 32-bit moments. Defaults are Code Llama's (β = (0.9, 0.95), weight decay 0.1).
        """

        def __init__(
            self,
            params: Iterable[torch.Tensor] | Iterable[dict],
            lr: float = 3e-4,
            betas: tuple[float, float] = (0.9, 0.95),
            eps: float = 1e-8,
            weight_decay: float = 0.1,
            min_8bit_size: int = 4096,
        ) -> None:
            """
            Args:
                params: Parameters (or parameter groups) to optimize.
                lr: Peak learning rate.
                betas: Decay rates of the first and second moment estimates.
                eps: Added to the denominator for numerical stability.
                weight_decay: Decoupled weight decay.
                min_8bit_size: Tensors with fewer elements keep 32-bit moments.
            """
            super().__init__(
                params,
                lr=lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
                min_8bit_size=min_8bit_size,
            )

    PagedAdamW8bit.__module__ = __name__
    PagedAdamW8bit.__qualname__ = "PagedAdamW8bit"
    return PagedAdamW8bit


def check_training_precision(precision: object) -> None:
    """Refuse to train with ``trainer.precision: bf16-true``: the weights the optimizer updates would be bf16.

    bf16 keeps 8 significant bits, so an update smaller than 1/256 of a weight rounds away: at lr 2e-5, 70% of
    AdamW's per-step updates of a 7B model are lost (96% at 2e-6) and fine-tuning silently stalls. ``bf16-mixed``
    computes in bf16 from float32 master weights (with FSDP2 they are sharded: 4 extra bytes per parameter over
    the world). Evaluation (``validate``, ``test``) in bf16-true is fine.
    """
    if str(precision) == "bf16-true":
        raise ValueError(
            f"trainer.precision={precision} trains bf16 weights: updates below 1/256 of a weight round to zero "
            "(70% of AdamW's at lr 2e-5); use trainer.precision: bf16-mixed with model.dtype: float32 (float32 "
            "master weights, bf16 compute)"
        )


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
