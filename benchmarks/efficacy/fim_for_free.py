"""Experiment 1, FIM for free (Bavarian et al. 2022; Code Llama §3.1): does training with FIM cost
left-to-right ability, and does it buy infilling?

Two tiny models are trained by ``recipes/quickstart.yaml`` on the same stdlib tokens, one with
``fim_rate`` 0 and one with 0.9 (everything else, including the seed, identical). Both are scored on the
files the recipe's split held out: left-to-right loss on the plain files, and single-line infilling exact
match with PSM and SPM prompts. Writes results/fim_for_free_seed<S>.json and .png and the experiment's
section of docs/efficacy.md.

    python benchmarks/efficacy/fim_for_free.py --seed 0
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from heldout import (
    held_out_files,
    infilling_exact_match,
    infilling_loss,
    left_to_right_loss,
    single_line_tasks,
)
from report import (
    add_common_arguments,
    command_line,
    load_results,
    plots_and_commands,
    pyplot,
    run_experiment,
    save_figure,
    spread,
    table,
)
from runs import ROOT, curve, fit_recipe, reload_run, use_cache

EXPERIMENT = "fim_for_free"
RECIPE = "recipes/quickstart.yaml"
FIM_RATES = (0.0, 0.9)
TASK_SEED = 0  # the infilling tasks stay the same across training seeds


def train_and_measure(args: argparse.Namespace, rate: float) -> dict:
    """Train the model with ``fim_rate`` = ``rate`` and measure it on the held-out files."""
    use_cache(args.cache)
    if args.parallel:
        torch.set_num_threads(1)  # one core per model: the two train side by side
    started = time.monotonic()
    run_dir = args.runs / f"seed{args.seed}" / f"fim{rate}"
    overrides = [
        *args.override,  # first: the experiment's own settings below always win
        f"--trainer.max_steps={args.steps}",
        f"--trainer.val_check_interval={args.val_every}",
        f"--data.init_args.fim.fim_rate={rate}",
    ]
    if args.measure_only:
        fitted = reload_run(RECIPE, run_dir, args.seed, overrides)
    else:
        fitted = fit_recipe(RECIPE, run_dir, args.seed, overrides)
    model, tokenizer = fitted.module.model.eval(), fitted.datamodule.tokenizer
    files = held_out_files(fitted.datamodule, "stdlib")
    tasks = single_line_tasks(files, args.per_file, TASK_SEED)
    scores = {"left_to_right": left_to_right_loss(model, tokenizer, files, fitted.datamodule.seq_len)}
    samples = {}
    for fim_format in ("psm", "spm"):
        scores[f"exact_match_{fim_format}"], samples[fim_format] = infilling_exact_match(
            model, tokenizer, tasks, fim_format, args.max_new_tokens
        )
        scores[f"infilling_loss_{fim_format}"] = infilling_loss(model, tokenizer, tasks, fim_format)
    return {
        "fim_rate": rate,
        "scores": scores,
        "val_loss_recipe": fitted.metrics.get("val_loss_after"),
        "train_loss_curve": curve(fitted.run_dir, "train/loss"),
        "held_out_files": len(files),
        "infilling_tasks": len(tasks),
        "samples": {k: v[:5] for k, v in samples.items()},
        "seconds": time.monotonic() - started,
    }


def run(args: argparse.Namespace) -> dict:
    """Train both models (side by side in two processes with ``--parallel``); returns the JSON result."""
    if args.parallel:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(FIM_RATES), mp_context=context) as pool:
            done = list(pool.map(train_and_measure, [args] * len(FIM_RATES), FIM_RATES))
    else:
        done = [train_and_measure(args, rate) for rate in FIM_RATES]
    models = {str(rate): entry for rate, entry in zip(FIM_RATES, done, strict=True)}
    return {
        "experiment": EXPERIMENT,
        "seed": args.seed,
        # The command that trains these models (re-measuring them later changes nothing they were trained on).
        "command": command_line("fim_for_free.py", [a for a in args.argv if a != "--measure-only"]),
        "settings": {
            "recipe": RECIPE,
            "steps": args.steps,
            "per_file": args.per_file,
            "max_new_tokens": args.max_new_tokens,
            "overrides": args.override,
        },
        "models": models,
    }


def plot(result: dict, path: Path) -> None:
    """Training loss curves, held-out left-to-right loss, and infilling exact match."""
    plt = pyplot()
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(17, 3.8))
    names = {"0.0": "fim_rate 0", "0.9": "fim_rate 0.9"}
    for key, entry in result["models"].items():
        steps, losses = (
            zip(*entry["train_loss_curve"], strict=True) if entry["train_loss_curve"] else ((), ())
        )
        ax1.plot(steps, losses, label=names.get(key, key))
    ax1.set(title="training loss (FIM rows included)", xlabel="step", ylabel="nats/token")
    ax1.legend()
    keys = list(result["models"])
    ax2.bar(
        [names.get(k, k) for k in keys],
        [result["models"][k]["scores"]["left_to_right"]["loss"] for k in keys],
    )
    ax2.set(title="left-to-right loss, held-out plain files", ylabel="nats/token")
    width = 0.38
    for i, key in enumerate(keys):
        scores = result["models"][key]["scores"]
        ax3.bar(
            [x + (i - 0.5) * width for x in range(2)],
            [scores["exact_match_psm"], scores["exact_match_spm"]],
            width,
            label=names.get(key, key),
        )
        if "infilling_loss_psm" in scores:
            ax4.bar(
                [x + (i - 0.5) * width for x in range(2)],
                [scores["infilling_loss_psm"], scores["infilling_loss_spm"]],
                width,
                label=names.get(key, key),
            )
    ax4.set_xticks(range(2), ["PSM", "SPM"])
    ax4.set(title="infilling loss of the true line", ylabel="nats/token")
    ax4.legend()
    ax3.set_xticks(range(2), ["PSM", "SPM"])
    ax3.set(title="single-line infilling exact match", ylabel="fraction", ylim=(0, 1))
    ax3.legend()
    save_figure(fig, f"FIM for free, seed {result['seed']}, {result['settings']['steps']} steps", path)


def render(results_dir: Path) -> str:
    """The docs section: one row per model, mean ± half-range over the seeds that have results."""
    found = load_results(results_dir, EXPERIMENT)
    if not found:
        return "## 1. FIM for free\n\nNot run yet."
    rows = []
    for key in found[0]["models"]:
        per_seed = [r["models"][key]["scores"] for r in found]
        rows.append(
            [
                f"fim_rate {found[0]['models'][key]['fim_rate']}",
                spread([s["left_to_right"]["loss"] for s in per_seed], 4),
                spread([s["exact_match_psm"] for s in per_seed]),
                spread([s["exact_match_spm"] for s in per_seed]),
                spread([s["infilling_loss_psm"] for s in per_seed if "infilling_loss_psm" in s], 4),
                spread([s["infilling_loss_spm"] for s in per_seed if "infilling_loss_spm" in s], 4),
            ]
        )
    first = found[0]
    ar = [
        r["models"]["0.9"]["scores"]["left_to_right"]["loss"]
        / r["models"]["0.0"]["scores"]["left_to_right"]["loss"]
        - 1
        for r in found
    ]
    plots, commands = plots_and_commands(found, EXPERIMENT, "FIM for free")
    return f"""## 1. FIM for free

Two tiny models (`{first["settings"]["recipe"]}`, {first["settings"]["steps"]} steps of 8 × 256 tokens) on the same
stdlib tokens, `fim_rate` 0 vs 0.9. Left-to-right loss is next-token NLL (nats/token, 256-token windows) on the
{first["models"]["0.0"]["held_out_files"]} held-out stdlib files as plain code; infilling is exact match of one
removed line in {first["models"]["0.0"]["infilling_tasks"]} tasks cut from the same held-out files
({first["settings"]["per_file"]} per file, greedy, ≤ {first["settings"]["max_new_tokens"]} new tokens).
Seeds: {", ".join(str(r["seed"]) for r in found)} (values are mean ± half-range when there are several).

{table(["model", "left-to-right loss", "infilling EM (PSM)", "infilling EM (SPM)", "infilling loss (PSM)", "infilling loss (SPM)"], rows)}

Left-to-right loss of the FIM model relative to the plain one: {", ".join(f"{x:+.1%}" for x in ar)} (per seed).

{plots}

Reproduce (from the repository root; written by the script, including this section):

```
{commands}
```"""


DEFAULT_STEPS = 2400


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, EXPERIMENT, ROOT / "runs" / "efficacy")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per model")
    parser.add_argument("--val-every", type=int, default=200, help="validation interval in steps")
    parser.add_argument(
        "--per-file", type=int, default=4, help="single-line infilling tasks per held-out file"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--measure-only", action="store_true", help="re-measure the models a previous run left in --runs"
    )
    parser.add_argument("--parallel", action="store_true", help="train the two models at once, one core each")
    return run_experiment(parser, argv, EXPERIMENT, run, plot, render)


if __name__ == "__main__":
    main()
