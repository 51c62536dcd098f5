"""Training callbacks: throughput, learning rate and gradient norm in the progress bar and the logs, the loss
history the end-of-run summary plots, and early dropout."""

from __future__ import annotations

import logging
import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from codetune.checkpoints.integrity import NonFiniteError, non_finite
from codetune.data.batch import real_tokens

# Dense bf16/fp16 tensor-core peak per GPU, FLOP/s (NVIDIA data sheets, without sparsity). Lightning's own table
# lists H200 at its sparse figure and misses device names such as "NVIDIA H200", hence this short one.
PEAK_FLOPS_BF16: dict[str, float] = {
    "a100": 312e12,  # SXM and PCIe alike
    "h100 sxm": 989e12,
    "h100 pcie": 756e12,
    "h100 nvl": 835e12,
    "h200": 989e12,  # SXM
    "h200 nvl": 835e12,
}
_HALF_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true", "bf16", "16")


def gpu_chip(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS_BF16` key of a CUDA device name (``torch.cuda.get_device_name``), if listed."""
    name = device_name.lower()
    if "h200" in name:
        return "h200 nvl" if "nvl" in name else "h200"
    if "h100" in name:
        for variant, marks in (("nvl", ("nvl",)), ("pcie", ("pcie",)), ("sxm", ("sxm", "hbm3"))):
            if any(mark in name for mark in marks):
                return f"h100 {variant}"
        return None  # an H100 whose variant the name does not tell: no guess
    if "a100" in name:
        return "a100"
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one ``device`` at ``precision``: A100/H100/H200 in bf16/fp16 only, else ``None`` (CPU,
    other GPUs, and float32, whose TF32 peak is a different number)."""
    if device.type != "cuda" or str(precision) not in _HALF_PRECISIONS:
        return None
    chip = gpu_chip(torch.cuda.get_device_name(device))
    return PEAK_FLOPS_BF16.get(chip) if chip else None


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, App. B), adapters included.

    N counts the weights of linear layers (the matmuls; embedding lookups are free, the output head is not),
    read from their ``in_features``/``out_features`` so 4-bit and sharded layers count at full size. A frozen
    weight needs no weight gradient: it costs 4 FLOPs per weight per token (forward, input gradient), a trained
    one 6. The attention term counts the full causal square, as PaLM does; activation recomputation is not
    counted (that would be hardware FLOPs, not model FLOPs).
    """
    total = trained = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n = module.in_features * module.out_features
            total += n
            trained += n if module.weight.requires_grad else 0
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (
        getattr(config, "hidden_size", 0) // heads if heads else 0
    )
    return 4 * total + 2 * trained + 12 * layers * heads * head_dim * seq_len


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar; a run bounded by steps counts optimizer steps of the whole run.

    Lightning's bar counts the batches of the current epoch against the epoch's length, so a resumed run shows
    ``18/29 ... 40/29`` and every epoch starts again at 0; a step-bounded run (``max_steps``, no ``max_epochs``)
    shows ``step/max_steps`` instead, continued across resumes, without the "Epoch 0/-2" label.
    """

    def _steps_bounded(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs is not None and trainer.max_epochs < 0 and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._steps_bounded():
            return self.trainer.max_steps
        return super().total_train_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._steps_bounded():
            batch_idx = trainer.global_step - 1  # the bar shows batch_idx + 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _get_train_description(self, current_epoch: int) -> str:
        if (
            self.trainer.max_epochs is not None and self.trainer.max_epochs < 0
        ):  # unbounded: max_steps decides
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)


class Throughput(L.Callback):
    """Logs tokens/s and real (non-pad) tokens/s, shown in the progress bar, and the model FLOPs utilisation (MFU)
    on GPUs with a known peak (A100, H100, H200 in bf16/fp16).

    Measured over windows of ``window`` batches with one device synchronize at the end of each: a synchronize
    (and reading a count off the GPU) every micro-batch would stall the queue of kernels the host has launched
    ahead. Real tokens are summed on the device and read once per window; validation time is left out.
    """

    def __init__(self, window: int = 10) -> None:
        """
        Args:
            window: Log once per this many batches, timed over them, so the number shown is steady.
        """
        if window < 1:
            raise ValueError(f"Throughput.window must be >= 1, got {window}")
        self.window = window
        self._tokens = 0
        self._real: torch.Tensor | int = 0
        self._batches = 0
        self._window_start: float | None = None
        self._paused_at: float | None = None
        self.total_tokens = 0
        self._total_real = 0
        self.train_seconds = 0.0
        self._flops_per_token: float | None = None
        self._peak: float | None = None
        self._device = torch.device("cpu")
        self.mfu: float | None = None
        """The last MFU measured (fraction of peak), ``None`` where no peak is known."""

    @property
    def total_real_tokens(self) -> int:
        """Real tokens of every window logged so far."""
        return self._total_real

    def on_train_start(self, trainer, pl_module) -> None:
        self._device = trainer.strategy.root_device
        self._peak = peak_flops(self._device, trainer.precision)
        self._flops_per_token = None
        self._window_start, self._batches, self._tokens, self._real = None, 0, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._window_start is None:
            if not self.train_seconds:
                self._sync()  # the first window: not the model's loading and transfers
            self._window_start = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._window_start is not None:
            self._sync()
            self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._paused_at is not None and self._window_start is not None:
            self._window_start += time.perf_counter() - self._paused_at
        self._paused_at = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._window_start is None:
            return
        self._batches += 1
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        self._real = self._real + real_tokens(batch).sum()  # stays on the device until the window ends
        max_steps = trainer.max_steps if trainer.max_steps is not None else -1
        last = trainer.is_last_batch or (max_steps >= 0 and trainer.global_step >= max_steps)
        if self._batches >= self.window or last:
            self._log_window(trainer, pl_module, batch)

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # kernels run asynchronously: time the work, not its launch

    def _log_window(self, trainer, pl_module, batch) -> None:
        self._sync()
        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        real = int(self._real) * trainer.world_size
        self.total_tokens += self._tokens
        self._total_real += real
        self.train_seconds += seconds
        tokens_per_s = self._tokens / seconds
        pl_module.log("tok/s", tokens_per_s, prog_bar=True, on_step=True)
        pl_module.log("real_tok/s", real / seconds, on_step=True)
        if self._peak is not None:
            if self._flops_per_token is None:
                model = getattr(pl_module, "model", None) or pl_module
                self._flops_per_token = flops_per_token(model, batch["input_ids"].shape[1])
            # Every token costs its FLOPs, padding included; the peak is per device.
            self.mfu = self._flops_per_token * tokens_per_s / (self._peak * trainer.world_size)
            pl_module.log("mfu", self.mfu, prog_bar=True, on_step=True)
        self._window_start, self._batches, self._tokens, self._real = None, 0, 0, 0


class StopOnNonFinite(L.Callback):
    """Stops a run, with one clear error, at the first optimizer step whose loss or trained weights are not finite.

    Checked after every training batch and before the checkpoint callbacks of that batch run (Lightning runs them
    last), so no checkpoint of the broken weights is written and ``last`` keeps the newest good state. All ranks
    agree on the decision (each checks its own shards), so none is left waiting in a collective.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        bad_loss = isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all())
        trained = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        broken = non_finite(trained)
        if not trainer.strategy.reduce_boolean_decision(bad_loss or bool(broken), all=False):
            return
        saved = getattr(trainer.checkpoint_callback, "last_model_path", None) or "none yet"
        what = (
            f"{len(broken)} trained weights hold NaN or infinite values ({', '.join(broken[:2])})"
            if broken
            else "the weights are still finite"
        )
        raise NonFiniteError(
            f"step {trainer.global_step}: the training loss is {float(loss) if isinstance(loss, torch.Tensor) else loss}"
            f" and {what}; stopped without saving them (newest checkpoint: {saved}). Lower the learning rate or "
            "raise trainer.gradient_clip_val, then resume from that checkpoint or start again"
        )


class StepStats(L.Callback):
    """Logs the learning rate and the gradient norm of every optimizer step (``lr``, ``grad_norm``: progress bar,
    CSV, TensorBoard) and keeps the loss history for the end-of-fit plot.

    The norm is the total 2-norm over every trained parameter before clipping (what ``gradient_clip_val`` is
    compared with), and of the whole model under FSDP2 (sharded gradients are reduced).
    """

    def __init__(self) -> None:
        self.train_loss: list[tuple[int, float]] = []
        """``(optimizer step, train/loss)`` of each logged training batch."""
        self.val_loss: list[tuple[int, float]] = []
        """``(optimizer step, val/loss)`` of each validation run during and around the fit."""
        self.val_batch_seconds: list[float] = []
        """Wall-clock seconds of each validation batch (the plan's estimate of a training step starts here)."""
        self._val_t0: float | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pl_module.log("lr", float(optimizer.param_groups[0]["lr"]), prog_bar=True, on_step=True)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2: the reduced value
            pl_module.log("grad_norm", full() if full else norm, prog_bar=True, on_step=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.train_loss.append((trainer.global_step, float(loss)))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self._val_t0 is not None and not trainer.sanity_checking:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self.val_batch_seconds.append(time.perf_counter() - self._val_t0)

    def on_validation_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and not trainer.sanity_checking:
            self.val_loss.append((trainer.global_step, float(loss)))


class EarlyDropout(L.Callback):
    """Dropout in the first part of training only, decayed to zero (Liu et al. 2023, "Dropout Reduces
    Underfitting"; Refact's fine-tuning recipe): it steadies the early updates, then stops costing fit.

    Acts on every ``nn.Dropout`` (LoRA's included) and on the float rates Hugging Face modules pass to their
    attention and residual dropout (``attention_dropout``, ``residual_dropout``, ``attn_pdrop``, ...). The rates
    are restored when training ends.
    """

    def __init__(
        self,
        p: float | None = None,
        until: float = 0.1,
        until_step: int | None = None,
        schedule: Literal["linear", "constant"] = "linear",
    ) -> None:
        """
        Args:
            p: Starting rate for every dropout site; ``None`` starts each at the rate its model configured.
            until: Fraction of the run's optimizer steps after which dropout is zero.
            until_step: The same as an optimizer step count (takes precedence over ``until``).
            schedule: ``linear`` decays from the starting rate to zero; ``constant`` keeps it, then drops to zero.
        """
        if p is not None and not 0.0 <= p < 1.0:
            raise ValueError(f"EarlyDropout.p must be in [0, 1), got {p}")
        if not 0.0 < until <= 1.0:
            raise ValueError(f"EarlyDropout.until must be in (0, 1], got {until}")
        if until_step is not None and until_step < 1:
            raise ValueError(f"EarlyDropout.until_step must be >= 1, got {until_step}")
        if schedule not in ("linear", "constant"):
            raise ValueError(f"EarlyDropout.schedule must be linear or constant, got {schedule!r}")
        self.p = p
        self.until = until
        self.until_step = until_step
        self.schedule = schedule
        self._sites: list[tuple[torch.nn.Module, str, float]] = []
        self._stop = 1

    def on_train_start(self, trainer, pl_module) -> None:
        self._sites = dropout_sites(pl_module)
        self._stop = self.until_step or max(1, round(self.until * trainer.estimated_stepping_batches))
        if not any(self.p or rate for _, _, rate in self._sites):
            logging.getLogger(__name__).warning(
                "EarlyDropout: the model has no nonzero dropout to decay; set EarlyDropout.p (LoRA dropout "
                "needs adapter.dropout > 0 to exist at all)"
            )

    def scale(self, step: int) -> float:
        """Multiplier on the starting rates at optimizer step ``step``."""
        if step >= self._stop:
            return 0.0
        return 1.0 if self.schedule == "constant" else 1.0 - step / self._stop

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        scale = self.scale(trainer.global_step)
        for module, name, rate in self._sites:
            setattr(module, name, (self.p if self.p is not None else rate) * scale)
        pl_module.log("early_dropout_scale", scale, on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        for module, name, rate in self._sites:
            setattr(module, name, rate)


def dropout_sites(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, float]]:
    """Every dropout rate in ``model`` as ``(module, attribute, current rate)``."""
    sites = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            sites.append((module, "p", float(module.p)))
            continue
        for name, value in vars(module).items():
            if isinstance(value, float) and name.endswith(("dropout", "pdrop")):
                sites.append((module, name, value))
    return sites
