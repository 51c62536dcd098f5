"""Experiment 2, long-context fine-tuning (Code Llama §2.4): does a tiny model trained at length L use a
context of 4L, unchanged or after RoPE rescaling plus a short fine-tune at 4L?

A base is trained by ``recipes/quickstart.yaml`` (rows of L = 256 tokens, plain causal LM). Then, with
``recipes/tiny-lcft.yaml`` (rows of 4L = 1024) and the same step budget each: (b) θ raised 100× (10⁴ → 10⁶,
Code Llama's LCFT), (c) linear position interpolation ×4, (d) YaRN ×4, and a control that makes the same
fine-tune with RoPE unchanged (so the rescalings are compared with more training at 4L, not with less
training). Each model, and (a) the base unchanged, is scored on the held-out stdlib files: perplexity at L, 2L and 4L on the same tokens, and key
retrieval accuracy (``codetune.eval.retrieval``) per relative position at 4L (and at L as a control).
Writes results/long_context_seed<S>.json and .png and the experiment's section of docs/efficacy.md.

    python benchmarks/efficacy/long_context.py --seed 0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from heldout import held_out_files
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

from codetune.eval.perplexity import perplexity_by_length
from codetune.eval.retrieval import DEFAULT_POSITIONS, load_corpus, run_retrieval

EXPERIMENT = "long_context"
LCFT_RECIPE = "recipes/tiny-lcft.yaml"
L = 256  # the quickstart's row length
DEFAULT_STEPS, DEFAULT_LCFT_STEPS = 300, 60

_ROPE = "--model.init_args.model.rope"
BASE_THETA = 10000  # the quickstart's θ (the Llama default)
# Overrides of tiny-lcft.yaml's `model.rope`. Fields merge into the recipe's, so linear/YaRN restate the base's
# own θ (their default anyway) instead of clearing the recipe's theta.
VARIANTS = {
    # The control: the same rows, steps and optimiser as the rescalings, with the base's own RoPE.
    "continued": [f"{_ROPE}.type=theta", f"{_ROPE}.theta={BASE_THETA}", f"{_ROPE}.max_position_embeddings={4 * L}"],
    # Code Llama: θ 10,000 -> 1,000,000 (the recipe's own default is 100,000; the issue asks for 100x).
    "lcft_theta": [f"{_ROPE}.type=theta", f"{_ROPE}.theta={100 * BASE_THETA}", f"{_ROPE}.max_position_embeddings={4 * L}"],
    "linear": [
        f"{_ROPE}.type=linear", f"{_ROPE}.theta={BASE_THETA}", f"{_ROPE}.factor=4",
        f"{_ROPE}.original_max_position_embeddings={L}", f"{_ROPE}.max_position_embeddings={4 * L}",
    ],
    "yarn": [
        f"{_ROPE}.type=yarn", f"{_ROPE}.theta={BASE_THETA}", f"{_ROPE}.factor=4",
        f"{_ROPE}.original_max_position_embeddings={L}", f"{_ROPE}.max_position_embeddings={4 * L}",
    ],
}  # fmt: skip
LABELS = {
    "base": "(a) base, unchanged",
    "continued": "(control) fine-tuned, RoPE unchanged",
    "lcft_theta": "(b) LCFT θ×100",
    "linear": "(c) linear ×4",
    "yarn": "(d) YaRN ×4",
}


def measure(model, tokenizer, streams, corpus, args) -> dict:
    """Perplexity at L, 2L, 4L on the same held-out tokens, and retrieval accuracy at L and 4L."""
    model.eval()
    report = perplexity_by_length(model, streams, [L, 2 * L, 4 * L], max_tokens=args.ppl_tokens)
    retrieval, _ = run_retrieval(
        model, tokenizer, corpus, [L, 4 * L], DEFAULT_POSITIONS, samples=args.samples, seed=0
    )
    return {
        "perplexity": {str(k): v for k, v in report.perplexity.items()},
        "scored_tokens": {str(k): v for k, v in report.tokens.items()},
        "retrieval": retrieval["accuracy"],
    }


def run(args: argparse.Namespace) -> dict:
    """Train the base and the three fine-tunes, measure all four; returns the result written to JSON."""
    use_cache(args.cache)
    runs = args.runs / f"seed{args.seed}"
    started = time.monotonic()
    base = fit_base(args, ["--data.init_args.fim=null"])
    tokenizer = base.datamodule.tokenizer
    files = held_out_files(base.datamodule, "stdlib")
    streams = [
        tokenizer(f.text, add_special_tokens=False, split_special_tokens=True)["input_ids"] for f in files
    ]
    corpus = load_corpus("@stdlib")
    models = {"base": {**measure(base.module.model, tokenizer, streams, corpus, args),
                       "seconds": time.monotonic() - started}}  # fmt: skip
    for name, rope in VARIANTS.items():
        started = time.monotonic()
        tuned = fit_recipe(
            LCFT_RECIPE,
            runs / name,
            args.seed,
            [*args.override, *args.lcft_override, f"--model.init_args.model.name_or_path={base.checkpoint}",
             *rope, f"--trainer.max_steps={args.lcft_steps}", f"--trainer.val_check_interval={args.lcft_steps}"],
        )  # fmt: skip
        models[name] = {
            **measure(tuned.module.model, tokenizer, streams, corpus, args),
            "train_loss_curve": curve(tuned.run_dir, "train/loss"),
            "seconds": time.monotonic() - started,
        }
    return {
        "experiment": EXPERIMENT,
        "seed": args.seed,
        "command": command_line("long_context.py", args.argv),
        "settings": {
            "base_recipe": BASE_RECIPE,
            "lcft_recipe": LCFT_RECIPE,
            "L": L,
            "base_steps": args.steps,
            "lcft_steps": args.lcft_steps,
            "retrieval_samples": args.samples,
            "held_out_files": len(files),
            "overrides": args.override + args.base_override + args.lcft_override,
        },
        "models": models,
    }


def plot(result: dict, path: Path) -> None:
    """Perplexity by context length, and retrieval accuracy by position at 4L, per model."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, entry in result["models"].items():
        lengths = sorted(entry["perplexity"], key=int)
        ax1.plot(
            [int(n) for n in lengths], [entry["perplexity"][n] for n in lengths], "o-", label=LABELS[name]
        )
        row = entry["retrieval"][str(4 * L)]
        positions = sorted(row, key=float)
        ax2.plot([float(p) for p in positions], [row[p] for p in positions], "o-", label=LABELS[name])
    ax1.set(
        title="held-out perplexity by context length", xlabel="context length (tokens)", ylabel="perplexity"
    )
    ax1.set_xticks([L, 2 * L, 4 * L], [str(L), str(2 * L), str(4 * L)])
    ax1.legend()
    ax2.set(
        title=f"key retrieval at {4 * L} tokens", xlabel="relative position of the key", ylabel="accuracy"
    )
    ax2.set_ylim(-0.05, 1.05)
    save_figure(fig, f"Long context, seed {result['seed']}", path)


def render(results_dir: Path) -> str:
    """The docs section, mean ± half-range over the seeds that have results."""
    found = load_results(results_dir, EXPERIMENT)
    if not found:
        return "## 2. Long-context fine-tuning\n\nNot run yet."
    first = found[0]
    rows = []
    for name in first["models"]:
        entries = [r["models"][name] for r in found]
        cells = [spread([e["perplexity"][str(m * L)] for e in entries], 2) for m in (1, 2, 4)]
        cells += [spread([_mean(e["retrieval"][str(length)]) for e in entries], 2) for length in (L, 4 * L)]
        rows.append([LABELS[name], *cells])
    positions = sorted(first["models"]["base"]["retrieval"][str(4 * L)], key=float)
    by_position = [
        [LABELS[name]]
        + [spread([r["models"][name]["retrieval"][str(4 * L)][p] for r in found], 2) for p in positions]
        for name in first["models"]
    ]
    s = first["settings"]
    plots, commands = plots_and_commands(found, EXPERIMENT, "Long context")
    paired = _paired(found)
    return f"""## 2. Long-context fine-tuning

Base: `{s["base_recipe"]}` without FIM, {s["base_steps"]} steps at L = {L}. Each fine-tune: `{s["lcft_recipe"]}`,
{s["lcft_steps"]} steps of 2 × {4 * L} tokens, differing only in `model.rope`. Perplexity is on the same tokens of the
{s["held_out_files"]} held-out stdlib files at every length; retrieval is {s["retrieval_samples"]} prompts per
(length, position), greedy. Seeds: {", ".join(str(r["seed"]) for r in found)} (mean ± half-range when several).

{table(["model", f"ppl @{L}", f"ppl @{2 * L}", f"ppl @{4 * L}", f"retrieval @{L} (control)", f"retrieval @{4 * L}"], rows)}

{paired}

Retrieval accuracy at {4 * L} tokens by relative position of the key function:

{table(["model", *positions], by_position)}

{plots}

Reproduce (from the repository root; written by the script, including this section):

```
{commands}
```"""


def _paired(found: list[dict]) -> str:
    """Within-seed comparisons: the base model differs a lot from seed to seed, the methods much less."""
    if not all("continued" in r["models"] for r in found):
        return "(No RoPE-unchanged control in these results, so no paired comparison.)"
    seeds = [f"seed {r['seed']}" for r in found]
    rows = []
    for name in found[0]["models"]:
        cells = []
        for r in found:
            ppl = r["models"][name]["perplexity"]
            control = r["models"]["continued"]["perplexity"][str(4 * L)]
            cells.append(f"{ppl[str(4 * L)] / control - 1:+.2%} / {ppl[str(4 * L)] / ppl[str(L)]:.3f}")
        rows.append([LABELS[name], *cells])
    return f"""Paired, per seed: perplexity at {4 * L} relative to the RoPE-unchanged control of the same seed (negative is
better than the control), and perplexity at {4 * L} over perplexity at {L} (below 1: the longer context helps).

{table(["model", *seeds], rows)}"""


def _mean(row: dict[str, float]) -> float:
    return sum(row.values()) / len(row)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, EXPERIMENT, ROOT / "runs" / "efficacy")
    add_base_arguments(parser, DEFAULT_STEPS, " at L")
    parser.add_argument("--lcft-steps", type=int, default=DEFAULT_LCFT_STEPS, help="fine-tuning steps at 4L")
    parser.add_argument("--samples", type=int, default=4, help="retrieval prompts per (length, position)")
    parser.add_argument("--ppl-tokens", type=int, default=65536, help="held-out tokens scored per length")
    parser.add_argument(
        "--lcft-override", action="append", default=[], help="extra override for the fine-tunes"
    )
    return run_experiment(parser, argv, EXPERIMENT, run, plot, render)


if __name__ == "__main__":
    main()
