"""The end of a ``codetune fit``: what ran, how long, how the validation loss moved, and where the run is."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from codetune.callbacks import Throughput


def val_loss(metrics: list[dict[str, float]]) -> float | None:
    return float(metrics[0]["val/loss"]) if metrics and "val/loss" in metrics[0] else None


def val_losses(metrics: list[dict[str, float]]) -> dict[str, float]:
    prefix = "val/loss/"
    return {
        k[len(prefix) :]: float(v) for k, v in (metrics[0] if metrics else {}).items() if k.startswith(prefix)
    }


def checkpoint_path(trainer) -> str | None:
    """The newest checkpoint this run wrote (``last`` if kept)."""
    cb = trainer.checkpoint_callback
    if cb is None:
        return None
    return cb.last_model_path or cb.best_model_path or None


def print_summary(cli: Any, run_dir: str | None = None) -> None:
    """The summary table of a finished fit (``cli``: the :class:`~codetune.commands.fit.CodetuneCLI` that ran)."""
    trainer = cli.trainer
    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    table = Table(title="codetune fit: summary", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths are for copying: wrapped whole, never cut to "…"
    table.add_row("steps", str(trainer.global_step))
    table.add_row("time", f"{cli.fit_seconds:.1f} s")
    if throughput is not None and throughput.train_seconds > 0:
        table.add_row(
            "tokens trained", f"{throughput.total_real_tokens:,} real of {throughput.total_tokens:,}"
        )
        table.add_row("tokens/s", f"{throughput.total_tokens / throughput.train_seconds:,.0f}")
    if cli.initial_val_loss is not None:
        table.add_row("val loss before", f"{cli.initial_val_loss:.4f}")
    if cli.final_val_loss is not None:
        table.add_row("val loss after", f"{cli.final_val_loss:.4f}")
    # The overall loss mixes sources: instruction tuning can lower the instruction loss while the code loss rises,
    # and only the parts say which happened.
    for name, after in cli.final_val_losses.items():
        if not math.isfinite(after):  # nothing of this source in the batches validated
            continue
        before = cli.initial_val_losses.get(name)
        table.add_row(
            f"  val loss {name}", (f"{before:.4f} -> " if before is not None else "") + f"{after:.4f}"
        )
    table.add_row("checkpoint", str(checkpoint_path(trainer)))
    table.add_row("run dir", str(run_dir if run_dir is not None else trainer.log_dir))
    Console(stderr=True).print(table)
