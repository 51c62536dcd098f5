"""Experiment 3, rehearsal (Code Llama - Instruct §2.5): does mixing 6% code and 2% natural language into
instruction tuning keep a code model's code ability closer to where it was?

A base is trained by ``recipes/quickstart.yaml``; ``recipes/tiny-instruct.yaml`` then instruction-tunes it
twice with the same seed and steps: with its rehearsal mix (92% instructions, 6% code, 2% NL) and without
(100% instructions). Code loss is left-to-right loss on stdlib files held out from the base *and* never in the
rehearsal's training side, before and after each; instruction loss is the recipe's ``val/loss/instruct``
(assistant tokens of held-out conversations) before and after. Writes results/rehearsal_seed<S>.json and
.png and the experiment's section of docs/efficacy.md.

    python benchmarks/efficacy/rehearsal.py --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from heldout import HeldOutFile, held_out_files, left_to_right_loss
from report import (
    add_base_arguments,
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
from runs import BASE_RECIPE, ROOT, curve, fit_base, fit_recipe, use_cache

from codetune.data.curation import split_of

EXPERIMENT = "rehearsal"
INSTRUCT_RECIPE = "recipes/tiny-instruct.yaml"
DEFAULT_STEPS, DEFAULT_INSTRUCT_STEPS = 400, 60
MIXES = {
    "rehearsal": {"instruct": 0.92, "code": 0.06, "nl": 0.02},  # the recipe's own mix
    "no_rehearsal": {"instruct": 1.0, "code": 0.0, "nl": 0.0},
}
LABELS = {"rehearsal": "with rehearsal (92/6/2)", "no_rehearsal": "without (100% instructions)"}


def never_trained(files: list[HeldOutFile], datamodule, source_name: str) -> list[HeldOutFile]:
    """The ``files`` that ``source_name`` of ``datamodule`` does not train on (its split differs by source)."""
    source = next(s for s in datamodule.sources if s.name == source_name)
    split = datamodule.split
    trained = {d.doc_id for d in source.documents() if split_of(d, split.val_fraction, split.seed) == "train"}
    return [f for f in files if f.doc_id not in trained]


def run(args: argparse.Namespace) -> dict:
    """Train the base, tune it with and without rehearsal, measure; returns the result written to JSON."""
    use_cache(args.cache)
    runs = args.runs / f"seed{args.seed}"
    base = fit_base(args)
    tokenizer, seq_len = base.datamodule.tokenizer, base.datamodule.seq_len
    base_held_out = held_out_files(base.datamodule, "stdlib")
    models: dict[str, dict] = {}
    files: list[HeldOutFile] | None = None
    for name, weights in MIXES.items():
        started = time.monotonic()
        tuned = fit_recipe(
            INSTRUCT_RECIPE,
            runs / name,
            args.seed,
            [*args.override, *args.instruct_override, f"--model.init_args.model.name_or_path={base.checkpoint}",
             f"--data.init_args.mix.weights={json.dumps(weights)}",
             # An epoch of the demo instructions is a couple of batches: count validation in steps, not epochs.
             f"--trainer.max_steps={args.instruct_steps}", "--trainer.check_val_every_n_epoch=null",
             f"--trainer.val_check_interval={args.instruct_steps}"],
        )  # fmt: skip
        if files is None:  # both runs read the same sources; only their shares differ
            files = never_trained(base_held_out, tuned.datamodule, "code")
            if not files:
                raise ValueError("no stdlib file is held out from both the base and the rehearsal data")
            code_before = left_to_right_loss(base.module.model.eval(), tokenizer, files, seq_len)
        instruct_curve = curve(tuned.run_dir, "val/loss/instruct")
        models[name] = {
            "mix": weights,
            "code_loss_after": left_to_right_loss(tuned.module.model.eval(), tokenizer, files, seq_len),
            "instruct_loss_before": instruct_curve[0][1]
            if instruct_curve and instruct_curve[0][0] == 0
            else None,
            "instruct_loss_after": tuned.metrics.get("val/loss/instruct"),
            "train_loss_curve": curve(tuned.run_dir, "train/loss"),
            "seconds": time.monotonic() - started,
        }
    return {
        "experiment": EXPERIMENT,
        "seed": args.seed,
        "command": command_line("rehearsal.py", args.argv),
        "settings": {
            "base_recipe": BASE_RECIPE,
            "instruct_recipe": INSTRUCT_RECIPE,
            "base_steps": args.steps,
            "instruct_steps": args.instruct_steps,
            "code_eval_files": len(files or []),
            "overrides": args.override + args.base_override + args.instruct_override,
        },
        "code_loss_before": code_before,
        "models": models,
    }


def plot(result: dict, path: Path) -> None:
    """Code loss before/after each tuning, and instruction loss before/after."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, entry in result["models"].items():
        # Lines, not bars: the differences are small next to the losses themselves.
        ax1.plot([0, 1], [result["code_loss_before"]["loss"], entry["code_loss_after"]["loss"]], "o-",
                 label=LABELS[name])  # fmt: skip
        ax2.plot(
            [0, 1], [entry["instruct_loss_before"], entry["instruct_loss_after"]], "o-", label=LABELS[name]
        )
    ax1.set_xticks([0, 1], ["base", "after tuning"])
    ax1.set(title="code loss, held-out stdlib files", ylabel="nats/token")
    ax2.set_xticks([0, 1], ["base", "after tuning"])
    ax2.set(title="instruction loss (assistant tokens)", ylabel="nats/token")
    ax1.legend()
    save_figure(fig, f"Rehearsal, seed {result['seed']}", path)


def render(results_dir: Path) -> str:
    """The docs section, mean ± half-range over the seeds that have results."""
    found = load_results(results_dir, EXPERIMENT)
    if not found:
        return "## 3. Rehearsal\n\nNot run yet."
    first, s = found[0], found[0]["settings"]
    rows = []
    for name in [n for n in MIXES if n in first["models"]]:
        entries = [(r["code_loss_before"]["loss"], r["models"][name]) for r in found]
        rows.append([
            LABELS[name],
            spread([b for b, _ in entries], 4),
            spread([e["code_loss_after"]["loss"] for _, e in entries], 4),
            spread([e["code_loss_after"]["loss"] - b for b, e in entries], 4),
            spread([e["instruct_loss_before"] for _, e in entries if e["instruct_loss_before"] is not None], 4),
            spread([e["instruct_loss_after"] for _, e in entries], 4),
        ])  # fmt: skip
    plots, commands = plots_and_commands(found, EXPERIMENT, "Rehearsal")
    return f"""## 3. Rehearsal

Base: `{s["base_recipe"]}`, {s["base_steps"]} steps. Instruction tuning: `{s["instruct_recipe"]}`, {s["instruct_steps"]} steps
of 8 × 512 tokens, same seed, differing only in `data.mix.weights`. Code loss is next-token NLL (nats/token, 256-token
windows) on the {s["code_eval_files"]} stdlib files held out from the base and absent from the rehearsal's training
side; instruction loss is `val/loss/instruct` on the recipe's held-out conversations. Seeds:
{", ".join(str(r["seed"]) for r in found)} (mean ± half-range when several).

{table(["tuning", "code loss, base", "code loss, after", "Δ code loss", "instruction loss, base", "instruction loss, after"], rows)}

{plots}

Reproduce (from the repository root; written by the script, including this section):

```
{commands}
```"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, EXPERIMENT, ROOT / "runs" / "efficacy")
    add_base_arguments(parser, DEFAULT_STEPS, "")
    parser.add_argument("--instruct-steps", type=int, default=DEFAULT_INSTRUCT_STEPS)
    parser.add_argument(
        "--instruct-override", action="append", default=[], help="extra override for the tunings"
    )
    return run_experiment(parser, argv, EXPERIMENT, run, plot, render)


if __name__ == "__main__":
    main()
