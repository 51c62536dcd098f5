"""The two ends of a ``codetune fit``: the plan before training (steps, an estimate of the time) and the summary
after it (what ran, how long, how the validation loss moved, what was skipped, where the run is and what to run
next), with the run's record ``fit_summary.json`` that ``codetune export`` builds the model card from.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from codetune.callbacks import StepStats, Throughput
from codetune.checkpoints.locate import FIT_SUMMARY
from codetune.data.corpus import SKIPPED_FILE
from codetune.storage import atomic_write

log = logging.getLogger(__name__)

LOSS_PLOT = "loss.png"

TRAIN_TO_FORWARD = 3.0
"""A training step costs about three forward passes (forward, then a backward of about twice the work)."""


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


def _callback(trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


# ---- before training --------------------------------------------------------------------------------------


def planned_steps(trainer, train_rows: int | None, batch_size: int) -> tuple[int | None, float | None]:
    """``(optimizer steps, epochs)`` the fit will run: ``max_steps``, or the epochs' batches (map-style data)."""
    accumulate = max(1, int(trainer.accumulate_grad_batches or 1))
    world = max(1, int(trainer.world_size or 1))
    per_epoch = None
    if train_rows:
        per_epoch = math.ceil(math.ceil(train_rows / world) / batch_size / accumulate)
    steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    if steps is None and per_epoch and trainer.max_epochs and trainer.max_epochs > 0:
        steps = per_epoch * trainer.max_epochs
    epochs = steps / per_epoch if steps and per_epoch else None
    return steps, epochs


def plan_line(cli: Any) -> str:
    """One line before training: the steps it will run and, from the validation pass's speed, how long."""
    trainer, data = cli.trainer, cli.datamodule
    rows = len(data.train_rows) if getattr(data, "train_rows", None) is not None else None
    steps, epochs = planned_steps(trainer, rows, data.batch_size)
    if steps is None:
        return "codetune fit: training until stopped (no max_steps, no epoch count)"
    rows_per_step = data.batch_size * max(1, int(trainer.accumulate_grad_batches or 1)) * trainer.world_size
    line = f"codetune fit: {steps:,} optimizer steps of {rows_per_step} rows x {data.seq_len} tokens"
    if epochs is not None:
        line += f" ({epochs:.2g} epochs of {rows:,} rows)"
    stats = _callback(trainer, StepStats)
    seconds = statistics.median(stats.val_batch_seconds) if stats and stats.val_batch_seconds else None
    if seconds:
        total = steps * max(1, int(trainer.accumulate_grad_batches or 1)) * TRAIN_TO_FORWARD * seconds
        line += (
            f"; about {_duration(total)} at the validation pass's speed ({TRAIN_TO_FORWARD:g} x its "
            f"{seconds * 1000:.0f} ms a batch; the progress bar shows the measured rate)"
        )
    else:
        line += "; the progress bar shows the time left once steps run"
    return line


def print_plan(cli: Any) -> None:
    Console(stderr=True).print(plan_line(cli), highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- after training ---------------------------------------------------------------------------------------


def fit_record(cli: Any, run_dir: Path) -> dict[str, Any]:
    """What the run did, as ``fit_summary.json`` keeps it (the model card's source of facts)."""
    trainer = cli.trainer
    throughput = _callback(trainer, Throughput)
    data = cli.datamodule
    spec = getattr(cli.model, "spec", None)
    record: dict[str, Any] = {
        "steps": trainer.global_step,
        "fit_seconds": round(cli.fit_seconds, 3),
        "val_loss": {"before": cli.initial_val_loss, "after": cli.final_val_loss},
        "val_loss_by_source": {
            name: {"before": cli.initial_val_losses.get(name), "after": after}
            for name, after in cli.final_val_losses.items()
            if math.isfinite(after)
        },
        "checkpoint": checkpoint_path(trainer),
        "run_dir": str(run_dir),
        "base_model": getattr(spec, "name_or_path", None),
        "base_revision": (getattr(spec, "extra", None) or {}).get("revision"),
        "hardware": {
            "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
            "devices": trainer.num_devices,
            "num_nodes": trainer.num_nodes,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            **({"device_name": _device_name(trainer)} if _device_name(trainer) else {}),
        },
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
    }
    if throughput is not None:
        record["tokens"] = {
            "total": throughput.total_tokens,
            "real": throughput.total_real_tokens,
            "train_seconds": round(throughput.train_seconds, 3),
        }
    if hasattr(data, "record"):
        record["data"] = data.record()
    return record


def _device_name(trainer) -> str | None:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return None


def write_record(cli: Any, run_dir: Path) -> dict[str, Any]:
    """Write ``fit_summary.json``, the list of skipped files and the loss plot into the run; returns the record
    (with where each file went)."""
    record = fit_record(cli, run_dir)
    skipped = getattr(getattr(cli.datamodule, "corpus", None), "skipped_file", None)
    if skipped is not None and skipped.stat().st_size > 0:
        shutil.copyfile(skipped, run_dir / SKIPPED_FILE)
        record["skipped_file"] = str(run_dir / SKIPPED_FILE)
    record["loss_plot"] = plot_losses(_callback(cli.trainer, StepStats), run_dir / LOSS_PLOT)
    atomic_write(run_dir / FIT_SUMMARY, json.dumps(record, indent=1, default=str) + "\n")
    return record


def plot_losses(stats: StepStats | None, path: Path) -> str:
    """Train and validation loss by optimizer step as a PNG; returns the path, or why there is no plot."""
    if stats is None or not stats.train_loss:
        return "no plot: no training loss was logged"
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        from matplotlib import pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot(*zip(*stats.train_loss, strict=True), label="train/loss", linewidth=1)
    if stats.val_loss:
        axes.plot(*zip(*stats.val_loss, strict=True), "o-", label="val/loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return str(path)


def next_commands(run_dir: str, seq_len: int | None = None) -> list[str]:
    """What to run next on this run, with its path (perplexity at the length it trained on)."""
    quoted = run_dir if " " not in run_dir else f"'{run_dir}'"
    lengths = f" --lengths '[{seq_len}]'" if seq_len else ""
    return [
        f"codetune export --ckpt_path {quoted} --out exported/{Path(run_dir).parent.parent.name or 'model'}",
        f"codetune eval perplexity --model {quoted}{lengths}",
        f"codetune infill --model {quoted} --prefix before.py --suffix after.py",
    ]


def print_summary(cli: Any, run_dir: str | None = None) -> None:
    """The summary table of a finished fit (``cli``: the :class:`~codetune.commands.fit.CodetuneCLI` that ran),
    after writing the run's record into ``run_dir``."""
    trainer = cli.trainer
    run_dir = str(run_dir if run_dir is not None else trainer.log_dir)
    record = write_record(cli, Path(run_dir)) if Path(run_dir).is_dir() else {}
    throughput = _callback(trainer, Throughput)
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
    data = record.get("data") or {}
    for source in data.get("sources", []):
        skipped = (data.get("skipped") or {}).get(source["name"]) or {}
        counts = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "nothing skipped"
        hints = "".join(f"; {h}" for h in (data.get("hints") or {}).get(source["name"], []))
        kind = source["class_path"].rsplit(".", 1)[-1]
        table.add_row(f"source {source['name']}", f"{kind}, objective {source['objective']}; {counts}{hints}")
    if "skipped_file" in record:
        table.add_row("skipped files", record["skipped_file"])
    table.add_row("checkpoint", str(checkpoint_path(trainer)))
    table.add_row("run dir", run_dir)
    if record.get("loss_plot"):
        table.add_row("loss plot", record["loss_plot"])
    console = Console(stderr=True)
    console.print(table)
    # Outside the table, one a line, so they copy whole.
    commands = next_commands(run_dir, getattr(cli.datamodule, "seq_len", None))
    console.print("next:\n" + "\n".join(f"  {c}" for c in commands), highlight=False, soft_wrap=True)
