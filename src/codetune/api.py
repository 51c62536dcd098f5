"""Notebook entry points: the same recipes and code paths as the ``codetune`` command, returning Python objects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codetune.cli import CodetuneCLI, checkpoint_path


@dataclass
class FitResult:
    """What a finished ``fit`` leaves behind."""

    module: Any
    """The trained LightningModule (``module.model`` is the Hugging Face model)."""
    datamodule: Any
    """The data module, with its tokenizer (``datamodule.tokenizer``)."""
    trainer: Any
    """The Lightning Trainer that ran."""
    checkpoint: str | None
    """Path of the newest checkpoint written (``last.ckpt``), if checkpointing was on."""
    run_dir: str | None
    """The run's log directory (config.yaml, metrics.csv, checkpoints)."""
    metrics: dict[str, float]
    """Final logged metrics, plus ``val_loss_before`` / ``val_loss_after`` when validation ran."""


def fit(recipe: str | Path, overrides: list[str] | None = None) -> FitResult:
    """Train from a recipe, exactly as ``codetune fit --config RECIPE [OVERRIDES...]`` does.

    Example: ``codetune.fit("recipes/quickstart.yaml", overrides=["--trainer.max_steps=20"])``.
    """
    recipe = Path(recipe)
    if not recipe.is_file():
        raise FileNotFoundError(f"recipe {recipe} does not exist")
    cli = CodetuneCLI(args=["fit", "--config", str(recipe), *(overrides or [])])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    if cli.initial_val_loss is not None:
        metrics["val_loss_before"] = cli.initial_val_loss
    if cli.final_val_loss is not None:
        metrics["val_loss_after"] = cli.final_val_loss
    return FitResult(
        module=cli.model,
        datamodule=cli.datamodule,
        trainer=cli.trainer,
        checkpoint=checkpoint_path(cli.trainer),
        run_dir=cli.trainer.log_dir,
        metrics=metrics,
    )
