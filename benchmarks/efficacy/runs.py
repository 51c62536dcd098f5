"""Running a codetune recipe for an experiment: its own run folder, seed and data cache, quiet logs."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from codetune.api import FitResult, fit

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: recipes name data files relative to it, so experiments run from there."""


def fit_recipe(recipe: str, run_dir: Path, seed: int, overrides: list[str]) -> FitResult:
    """``codetune fit --config RECIPE`` with the experiment's seed and run folder, and no progress bar."""
    return fit(
        ROOT / recipe,
        overrides=[
            # seed_everything alone does not vary a run: weights are initialised from model.init_seed and rows
            # shuffled by data.seed, so a seed sets all three (FIM draws keep their own fixed seed).
            f"--seed_everything={seed}",
            f"--model.init_args.model.init_seed={seed}",
            f"--data.init_args.seed={seed}",
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            *overrides,
        ],
    )


BASE_RECIPE = "recipes/quickstart.yaml"
"""The base model of the long-context and rehearsal experiments."""


def fit_base(args: Any, extra: list[str] | tuple[str, ...] = ()) -> FitResult:
    """The experiment's base: ``BASE_RECIPE`` for ``args.steps`` steps, validated once at the end, in the seed's
    ``base`` run folder; ``extra`` overrides come last."""
    overrides = [*args.override, *args.base_override, f"--trainer.max_steps={args.steps}",
                 f"--trainer.val_check_interval={args.steps}", *extra]  # fmt: skip
    return fit_recipe(BASE_RECIPE, args.runs / f"seed{args.seed}" / "base", args.seed, overrides)


def reload_run(recipe: str, run_dir: Path, seed: int, overrides: list[str]) -> FitResult:
    """The model and data module a finished ``fit_recipe`` run left in ``run_dir``, without training again."""
    from codetune.checkpoints import load_trained
    from codetune.commands.fit import CodetuneCLI

    checkpoints = sorted(Path(run_dir).glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no lightning_logs/version_*/checkpoints/last.ckpt to re-measure")
    args = [
        "--config",
        str(ROOT / recipe),
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        *overrides,
    ]
    cli = CodetuneCLI(args=args, run=False)  # builds the data module (sources, split); trains nothing
    model, _ = load_trained(str(checkpoints[-1]))
    cli.model.model = model
    run = checkpoints[-1].parents[1]
    return FitResult(cli.model, cli.datamodule, cli.trainer, str(checkpoints[-1]), str(run), {})


def use_cache(cache: Path) -> None:
    """Pin tokenizer and packed-data caches to ``cache`` so reruns reuse exactly the same tokens, and work
    from the repository root, which the recipes' data paths are relative to."""
    cache = cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    os.environ["CODETUNE_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def curve(run_dir: str | None, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one logged metric from a run's metrics.csv (empty when it was never logged)."""
    if run_dir is None or not (Path(run_dir) / "metrics.csv").is_file():
        return []
    points = []
    with open(Path(run_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            value = row.get(key)
            if value not in (None, "") and math.isfinite(float(value)):
                points.append((int(row["step"]), float(value)))
    return points
