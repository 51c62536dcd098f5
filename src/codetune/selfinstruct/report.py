"""What a self-instruct run made, counted from its logs (so a resumed run reports everything, once).

``report.json`` holds the counts below; :func:`print_table` shows them; :func:`plot_histogram` draws the
number of passing candidates per problem (matplotlib, when installed).

Two kinds of failure are told apart among problems with no passing candidate: **tests failing every
candidate** — some test case failed on every candidate that reached the tests (likely a wrong test) — and
the rest, where candidates failed different cases or never reached them (likely wrong solutions).
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codetune.selfinstruct.problems import Problem
from codetune.selfinstruct.stage_log import StageLog
from codetune.storage import atomic_write

log = logging.getLogger(__name__)


def outcome_kind(result: str) -> str:
    """``passed``, ``timed out``, ``not run`` or ``failed``."""
    for kind in ("passed", "timed out", "not run"):
        if result.startswith(kind):
            return kind
    return "failed"


def tests_summary(problems: Sequence[Problem], tests_log: StageLog) -> dict[str, Any]:
    records = [tests_log.records[p.id] for p in problems if p.id in tests_log]
    status = Counter(r["status"] for r in records)
    return {
        "problems": len(problems),
        "done": len(records),
        "pending": len(problems) - len(records),
        "status": dict(sorted(status.items())),
        "usable": status.get("ok", 0),
        "vacuous": status.get("vacuous", 0),
        "trivial_solutions_run": sum(len(r["trivial"]) for r in records),
        "vacuous_ids": [r["id"] for r in records if r["status"] == "vacuous"][:10],
    }


def cases_failed_by_every_candidate(record: dict[str, Any]) -> list[int]:
    """Test cases that every candidate reaching the tests failed (empty when one passed or none got there)."""
    known = [set(c["failed_cases"]) for c in record["candidates"] if c.get("failed_cases") is not None]
    if record["passing"] or not known:
        return []
    return sorted(set.intersection(*known))


def solutions_summary(
    problems: Sequence[Problem], tests_log: StageLog, solutions_log: StageLog, candidates: int
) -> dict[str, Any]:
    eligible = [p for p in problems if tests_log.records.get(p.id, {}).get("status") == "ok"]
    records = [solutions_log.records[p.id] for p in eligible if p.id in solutions_log]
    all_candidates = [c for r in records for c in r["candidates"]]
    outcomes = Counter(outcome_kind(c["result"]) for c in all_candidates)
    without = [r for r in records if not r["passing"]]
    suspect = {r["id"]: cases for r in without if (cases := cases_failed_by_every_candidate(r))}
    per_problem = [
        {
            "id": r["id"],
            "candidates": len(r["candidates"]),
            "executed": sum(c["executed"] for c in r["candidates"]),
            "passing": r["passing"],
            "pass_rate": r["passing"] / len(r["candidates"]) if r["candidates"] else 0.0,
            "kept": r["kept"],
        }
        for r in records
    ]
    top = max([candidates, *(len(r["candidates"]) for r in records)])
    histogram = Counter(r["passing"] for r in records)
    return {
        "problems": len(eligible),
        "done": len(records),
        "pending": len(eligible) - len(records),
        "candidates_generated": len(all_candidates),
        "candidates_run": sum(c["executed"] for c in all_candidates),
        "candidates_passing": outcomes.get("passed", 0),
        "outcomes": dict(sorted(outcomes.items())),
        "problems_with_a_passing_candidate": len(records) - len(without),
        "problems_without_a_passing_candidate": len(without),
        "tests_failing_every_candidate": len(suspect),
        "tests_failing_every_candidate_cases": suspect,
        "candidates_wrong": len(without) - len(suspect),
        "mean_pass_rate": sum(p["pass_rate"] for p in per_problem) / len(per_problem)
        if per_problem
        else None,
        "passing_histogram": {str(k): histogram.get(k, 0) for k in range(top + 1)},
        "per_problem": per_problem,
    }


def print_table(report: dict[str, Any]) -> None:
    """The headline counts as one table on stderr."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="codetune selfinstruct", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    problems = report.get("problems") or {}
    if problems:
        source = problems.get("source", {})
        if "malformed" in source:
            table.add_row("problem lines read / malformed", f"{source['lines']} / {source['malformed']}")
        if "batches" in source:
            table.add_row("problem batches", str(source["batches"]))
        table.add_row("problems generated", str(problems.get("seen", 0)))
        table.add_row("  unique", str(problems.get("unique", 0)))
        table.add_row("  decontaminated (removed)", str(problems.get("contaminated", 0)))
        table.add_row("  kept", str(problems.get("kept", 0)))
    tests = report.get("tests") or {}
    if tests:
        status = ", ".join(f"{k} {v}" for k, v in tests["status"].items()) or "none"
        table.add_row("tests generated", f"{tests['done']} of {tests['problems']} ({status})")
        table.add_row("  vacuous", str(tests["vacuous"]))
    solutions = report.get("solutions") or {}
    if solutions:
        table.add_row(
            "candidates run / passing", f"{solutions['candidates_run']} / {solutions['candidates_passing']}"
        )
        table.add_row(
            "problems with a passing candidate",
            f"{solutions['problems_with_a_passing_candidate']} of {solutions['done']}",
        )
        table.add_row("  tests failing every candidate", str(solutions["tests_failing_every_candidate"]))
        table.add_row("  other problems with no passing candidate", str(solutions["candidates_wrong"]))
        if solutions["mean_pass_rate"] is not None:
            table.add_row("mean pass rate per problem", f"{solutions['mean_pass_rate']:.3f}")
    examples = report.get("examples") or {}
    if examples:
        table.add_row("examples kept", f"{examples['kept']} -> {examples['path']}")
    if report.get("plot"):
        table.add_row("plot", str(report["plot"]))
    Console(stderr=True).print(table)


def plot_histogram(histogram: dict[str, int], path: Path) -> str:
    """Passing candidates per problem as a bar chart; returns the PNG's path, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        message = "skipped: matplotlib is not installed (pip install matplotlib)"
        log.warning("selfinstruct: histogram %s", message)
        return message
    if not histogram or not sum(histogram.values()):
        return "skipped: no problem reached the solutions stage"
    xs = [int(k) for k in histogram]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(xs, [histogram[str(x)] for x in xs], color="#4c72b0")
    ax.set_xticks(xs)
    ax.set_xlabel("passing candidates")
    ax.set_ylabel("problems")
    ax.set_title("codetune selfinstruct: passing candidates per problem")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, png.getvalue())
    return str(path)
