"""Results of the efficacy experiments: one JSON per (experiment, seed), and the experiment's section of
docs/efficacy.md rewritten from every seed's JSON, so the numbers in the docs are exactly the scripts'."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent.parent / "docs" / "efficacy.md"


def command_line(script: str, argv: list[str]) -> str:
    """The exact command that produced a result, as the docs show it (run from the repository root)."""
    return " ".join(["python", f"benchmarks/efficacy/{script}", *map(shlex.quote, argv)])


def write_result(results_dir: Path, experiment: str, seed: int, result: dict[str, Any]) -> Path:
    """Write ``<experiment>_seed<seed>.json``; returns its path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{experiment}_seed{seed}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def load_results(results_dir: Path, experiment: str) -> list[dict[str, Any]]:
    """Every seed's result of ``experiment``, by seed."""
    found = [json.loads(p.read_text()) for p in sorted(results_dir.glob(f"{experiment}_seed*.json"))]
    return sorted(found, key=lambda r: r["seed"])


def spread(values: list[float], digits: int = 3) -> str:
    """``mean`` for one seed, ``mean ± half-range`` for several (the spread the issue asks for); ``n/a`` for none."""
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    half = (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def update_docs(docs: Path, experiment: str, render: Callable[[], str]) -> None:
    """Replace the text between ``experiment``'s markers in ``docs`` (append the section if it is missing)."""
    start, end = f"<!-- efficacy:{experiment}:start -->", f"<!-- efficacy:{experiment}:end -->"
    block = f"{start}\n{render().strip()}\n{end}"
    text = docs.read_text() if docs.is_file() else "# Efficacy experiments\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)


def add_common_arguments(parser: argparse.ArgumentParser, experiment: str, runs_root: Path) -> None:
    """The options every experiment has: seed, where runs, caches, results and docs go, extra overrides."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=runs_root / experiment)
    parser.add_argument("--cache", type=Path, default=runs_root / "cache")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--override", action="append", default=[], help="extra recipe override for every run")


def add_base_arguments(parser: argparse.ArgumentParser, default_steps: int, what: str) -> None:
    """The options of an experiment that first trains a base model with the quickstart recipe."""
    parser.add_argument("--steps", type=int, default=default_steps, help=f"base training steps{what}")
    parser.add_argument("--base-override", action="append", default=[], help="extra override for the base")


def run_experiment(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    experiment: str,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    plot: Callable[[dict[str, Any], Path], None],
    render: Callable[[Path], str],
) -> dict[str, Any]:
    """Parse ``argv`` (the command line when None; kept in ``args.argv`` for the result's ``command``), run one
    seed, write its JSON and plot, then rewrite the experiment's docs section from every seed's JSON."""
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    result = run(args)
    write_result(args.results, experiment, args.seed, result)
    plot(result, args.results / f"{experiment}_seed{args.seed}.png")
    update_docs(args.docs, experiment, lambda: render(args.results))
    return result


def plots_and_commands(found: list[dict[str, Any]], experiment: str, title: str) -> tuple[str, str]:
    """The docs' image lines (one plot per seed) and the commands that produced them."""
    plots = "\n".join(
        f"![{title}, seed {r['seed']}](../benchmarks/efficacy/results/{experiment}_seed{r['seed']}.png)"
        for r in found
    )
    return plots, "\n".join(r["command"] for r in found)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, title: str, path: Path) -> None:
    """Title, lay out, write as PNG and free ``fig``."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
