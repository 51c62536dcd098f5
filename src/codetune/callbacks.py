"""Training callbacks: throughput in the progress bar, and the end-of-run summary."""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    """Logs tokens/s and real (non-pad) tokens/s per optimizer step, shown in the progress bar."""

    def __init__(self, window: int = 10) -> None:
        """
        Args:
            window: Average over this many recent batches so the number shown is steady.
        """
        self.window = window
        self._times: list[float] = []
        self._tokens: list[tuple[int, int]] = []
        self.total_tokens = 0
        self.total_real_tokens = 0
        self.train_seconds = 0.0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            return
        elapsed = time.perf_counter() - self._t0
        tokens = batch["input_ids"].numel() * trainer.world_size
        real = int(real_token_count(batch)) * trainer.world_size
        self.total_tokens += tokens
        self.total_real_tokens += real
        self.train_seconds += elapsed
        self._times = (self._times + [elapsed])[-self.window :]
        self._tokens = (self._tokens + [(tokens, real)])[-self.window :]
        seconds = sum(self._times)
        pl_module.log("tok/s", sum(t for t, _ in self._tokens) / seconds, prog_bar=True, on_step=True)
        pl_module.log("real_tok/s", sum(r for _, r in self._tokens) / seconds, on_step=True)


def real_token_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens that are not padding: ``token_kind`` 0 marks pad; without it, every token counts."""
    if "token_kind" in batch:
        return (batch["token_kind"] != 0).sum()
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel())
