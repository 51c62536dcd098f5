"""HumanEval infilling: fill a gap in a HumanEval solution; scored by execution (pass@1) and exact match.

Two kinds of task sets:

- ``official`` (the default): the published task sets of Bavarian et al. 2022 (``openai/human-eval-infilling``),
  the benchmark of the SantaCoder, StarCoder and Code Llama infilling tables: ``single-line`` (1,033 tasks),
  ``multi-line`` (5,815), ``random-span`` (1,640) and ``random-span-light`` (164), read from the pinned files of
  :mod:`codetune.eval.benchmarks`.
- ``derived``: one task per HumanEval problem cut deterministically from its canonical solution (``single-line``
  removes one non-blank line, ``multi-line`` a block of at least two lines, ``random-span`` the characters
  between two uniform cut points); needs no download, but its scores are not the papers'.

Prompts come from the training FIM code (:class:`codetune.data.fim.FIMTransform`), in PSM or SPM order,
generation stops at the end-of-middle sentinel, and the program run in the sandbox is the official harness's:
``prefix + infill + suffix + "\n" + test + "\n" + "check(entry_point)"`` (the prompt order never enters it).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from codetune.data.fim import FIMConfig, FIMTransform
from codetune.data.repository import repo_tokens
from codetune.data.tokenizer import DEFAULT_SENTINELS, FIMSentinels, fim_sentinels, resolve_sentinels
from codetune.eval.benchmarks import INFILLING_FILES, InfillTask, load_infilling_tasks
from codetune.eval.generate import generate
from codetune.eval.humaneval import load_problems
from codetune.eval.sandbox import Sandbox, TestedProgram

log = logging.getLogger(__name__)

InfillMode = Literal["single-line", "multi-line", "random-span"]
TaskSource = Literal["official", "derived"]
MODES: tuple[str, ...] = ("single-line", "multi-line", "random-span")
"""Modes of the derived tasks (``official`` also has ``random-span-light``, see :data:`OFFICIAL_MODES`)."""
OFFICIAL_MODES: tuple[str, ...] = tuple(INFILLING_FILES)
FORMATS: tuple[str, ...] = ("psm", "spm")
MAX_BLOCK_LINES = 8  # multi-line blocks are 2..8 lines, the range of HumanEval function bodies


def select_tasks(
    source: TaskSource = "official",
    mode: str = "single-line",
    data_dir: str | Path | None = None,
    limit: int | None = None,
    problems: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    per_problem: int = 1,
) -> tuple[list[InfillTask], dict[str, Any]]:
    """The infilling tasks to run and what they are (for the results JSON); cheap, so call it before loading a model.

    ``official``: the published set of ``mode``, its first ``limit`` tasks (in file order) for smoke runs.
    ``derived``: ``per_problem`` tasks per HumanEval problem of ``problems`` (default all 164; ``limit``: the first
    ``limit`` problems), drawn with ``seed``.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if source == "official":
        if mode not in OFFICIAL_MODES:
            raise ValueError(f"unknown infilling mode {mode!r}: use one of {', '.join(OFFICIAL_MODES)}")
        task_set = load_infilling_tasks(mode, data_dir)
        tasks = task_set.tasks[:limit] if limit is not None else task_set.tasks
        meta = {"tasks": "official", "mode": mode, "task_set": task_set.meta(), "limit": limit}
        return tasks, meta
    if source != "derived":
        raise ValueError(f"unknown infilling task source {source!r}: use official or derived")
    check_mode(mode)
    problems = load_problems() if problems is None else problems
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    tasks = derive_tasks(problems, mode, seed=seed, per_problem=per_problem)
    meta = {"tasks": "derived", "mode": mode, "limit": limit, "seed": seed, "per_problem": per_problem}
    return tasks, meta


def derive_tasks(
    problems: dict[str, dict[str, Any]], mode: str, seed: int = 0, per_problem: int = 1
) -> list[InfillTask]:
    """The derived infilling tasks of ``mode``: ``per_problem`` per HumanEval problem, the same for the same seed.

    Each draw uses its own ``random.Random`` keyed by (seed, problem, mode, j), so tasks do not shift when
    problems are added, skipped or limited.
    """
    check_mode(mode)
    if per_problem < 1:
        raise ValueError(f"per_problem must be >= 1, got {per_problem}")
    tasks = []
    for problem_id, problem in problems.items():
        solution = problem["canonical_solution"]
        seen: set[tuple[int, int]] = set()
        for j in range(per_problem):
            rng = random.Random(f"{seed}/{problem_id}/{mode}/{j}")
            span = _draw_span(solution, mode, rng, seen)
            if span is None:
                break  # fewer distinct gaps than asked for (e.g. a one-line solution)
            seen.add(span)
            a, b = span
            tasks.append(
                InfillTask(
                    task_id=f"{problem_id}/{mode}/{j}",
                    problem_id=problem_id,
                    prefix=problem["prompt"] + solution[:a],
                    middle=solution[a:b],
                    suffix=solution[b:],
                    test=problem["test"],
                    entry_point=problem["entry_point"],
                )
            )
    return tasks


def _draw_span(
    solution: str, mode: str, rng: random.Random, taken: set[tuple[int, int]]
) -> tuple[int, int] | None:
    """Character span ``[a, b)`` of the gap, distinct from ``taken``; None when no new gap exists."""
    lines = solution.splitlines(keepends=True)
    starts = [sum(map(len, lines[:i])) for i in range(len(lines) + 1)]
    if mode == "single-line":
        candidates = [(starts[i], starts[i + 1]) for i, line in enumerate(lines) if line.strip()]
    elif mode == "multi-line":
        size = 2 if len(lines) >= 2 else 1
        candidates = [
            (starts[i], starts[j])
            for i in range(len(lines))
            for j in range(i + size, min(len(lines), i + MAX_BLOCK_LINES) + 1)
            if "".join(lines[i:j]).strip()
        ]
    else:  # random-span: two uniform cut points, as in FIM training (Bavarian et al. 2022)
        for _ in range(100):
            a, b = sorted(rng.randint(0, len(solution)) for _ in range(2))
            if solution[a:b].strip() and (a, b) not in taken:
                return a, b
        return None
    candidates = [c for c in candidates if c not in taken]
    return rng.choice(candidates) if candidates else None


def build_program(task: InfillTask, middle: str) -> str:
    """The program an infill is judged by, exactly as human-eval-infilling's ``check_correctness`` builds it
    (codetune runs the same code split in two, solution and tests apart: :func:`score_infills`)."""
    return f"{task.prefix}{middle}{task.suffix}\n{task.test}\ncheck({task.entry_point})"


def judged_program(task: InfillTask, middle: str) -> TestedProgram:
    """The program of :func:`build_program` as codetune runs it: the filled-in solution apart from its tests, which
    alone decide (:class:`~codetune.eval.sandbox.TestedProgram`); the HumanEval prompt is the tests' context, for
    the helpers some tests call."""
    context = _humaneval_prompts().get(task.problem_id, "")
    return TestedProgram(f"{task.prefix}{middle}{task.suffix}", task.test, task.entry_point, context=context)


@functools.cache
def _humaneval_prompts() -> dict[str, str]:
    return {task_id: problem["prompt"] for task_id, problem in load_problems().items()}


def exact_match(generated: str, expected: str) -> bool:
    """Equal up to trailing whitespace (a trailing newline is a tokenization detail, not a different infill)."""
    return generated.rstrip() == expected.rstrip()


def score_infills(
    tasks: Sequence[InfillTask], middles: Sequence[str], sandbox: Sandbox
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Execution pass@1 and exact match of one generated middle per task; returns scores and per-task records."""
    if len(middles) != len(tasks):
        raise ValueError(f"got {len(middles)} infills for {len(tasks)} tasks")
    if not tasks:
        raise ValueError("no infilling tasks to score")
    results = sandbox.run_many([judged_program(t, m) for t, m in zip(tasks, middles, strict=True)])
    records = [
        {
            "task_id": t.task_id,
            "expected": t.middle,
            "generated": m,
            "exact_match": exact_match(m, t.middle),
            "passed": r.passed,
            "result": r.result,
        }
        for t, m, r in zip(tasks, middles, results, strict=True)
    ]
    scores = {
        "pass@1": sum(r["passed"] for r in records) / len(records),
        "exact_match": sum(r["exact_match"] for r in records) / len(records),
    }
    return scores, records


# -- prompts: the seam to the training FIM code -----------------------------------------------------------


def require_sentinels(tokenizer: Any, sentinels: str | FIMSentinels | None = None) -> FIMSentinels:
    """The sentinel set to infill with; every one of its tokens must be a single token of ``tokenizer``.

    ``None``: the tokenizer's own set (:func:`codetune.data.tokenizer.fim_sentinels`); a tokenizer with none is
    checked against the default set, so the error names the tokens it lacks.
    """
    chosen = (
        resolve_sentinels(sentinels)
        if sentinels is not None
        else fim_sentinels(tokenizer) or DEFAULT_SENTINELS
    )
    vocab = tokenizer.get_vocab()
    missing = [t for t in (chosen.prefix, chosen.suffix, chosen.middle, chosen.end) if t not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer has no FIM sentinel tokens {missing} (set {sentinels!r}); infilling needs a model "
            "fine-tuned with FIM (its tokenizer then carries them) or --sentinels naming the set it was trained with"
        )
    return chosen


@dataclass(frozen=True)
class RepoContext:
    """The repository around a gap: repository-level infilling (StarCoder2, Qwen2.5-Coder) puts these files, with
    their headers, before the file being edited, as repository-level FIM trains it."""

    repo: str
    """The repository's name (after the repository token, or in the plain-text headers)."""
    files: tuple[tuple[str, str], ...]
    """``(path, code)`` of the context files, in the order they are shown (dependencies first)."""
    path: str
    """Path of the file being edited (its header comes right before the FIM prefix sentinel)."""


def build_infill_prompts(
    tokenizer: Any,
    pieces: Sequence[tuple[str, str]],
    fim_format: str,
    sentinels: FIMSentinels,
    contexts: Sequence[RepoContext | None] | None = None,
) -> tuple[list[list[int]], Any]:
    """Token ids of infilling prompts for (prefix, suffix) pairs, encoded by the training FIM code; a pair with a
    :class:`RepoContext` gets the repository-level layout (the tokenizer's repository tokens, else plain headers).

    Returns the ids and the :class:`~codetune.data.fim.FIMTransform` (for the end sentinel and decoding).
    """
    check_format(fim_format)
    transform = FIMTransform(FIMConfig(), tokenizer, sentinels)
    tokens = repo_tokens(tokenizer)
    prompts = []
    for (prefix, suffix), context in zip(pieces, contexts or [None] * len(pieces), strict=True):
        if context is None:
            prompts.append(transform.encode_infill_prompt(prefix, suffix, fim_format))
        else:
            prompts.append(
                transform.encode_repository_infill_prompt(
                    prefix, suffix, fim_format, context.repo, context.files, context.path, tokens
                )
            )
    return prompts, transform


def generate_infills(
    model: Any,
    tokenizer: Any,
    pieces: Sequence[tuple[str, str]],
    fim_format: str,
    sentinels: FIMSentinels,
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
    contexts: Sequence[RepoContext | None] | None = None,
) -> list[str]:
    """One generated middle per (prefix, suffix), stopping at the end-of-middle sentinel."""
    prompts, transform = build_infill_prompts(tokenizer, pieces, fim_format, sentinels, contexts)
    samples = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
        stop_token_ids=[transform.end_id], batch_size=batch_size, seed=seed,
        decode=transform.decode_middle,
    )  # fmt: skip
    return [s[0].text for s in samples]


def run_infilling(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[InfillTask],
    fim_format: str = "psm",
    sentinels: str | FIMSentinels | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    sandbox: Sandbox | None = None,
    task_meta: dict[str, Any] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, Any]]:
    """Generate and score greedy infills of ``tasks`` (from :func:`select_tasks`) with an in-memory model.

    Returns the scores (``pass@1``, ``exact_match``), one record per task, and the run's meta: ``task_meta``
    (which task set, checksum, limit) with the prompt format, sentinel set and generation settings.
    """
    check_format(fim_format)
    chosen = require_sentinels(tokenizer, sentinels)
    pieces = [(t.prefix, t.suffix) for t in tasks]
    middles = generate_infills(
        model, tokenizer, pieces, fim_format, chosen, max_new_tokens, batch_size, seed=seed
    )
    sandbox = sandbox or Sandbox()
    scores, records = score_infills(tasks, middles, sandbox)
    meta = {
        **(task_meta or {}),
        "num_tasks": len(records),
        "format": fim_format,
        "sentinels": asdict(chosen),
        "max_new_tokens": max_new_tokens,
        "sandbox": sandbox.report.as_dict(),
    }
    return scores, records, meta


def infill_one(
    model: Any,
    tokenizer: Any,
    prefix: str,
    suffix: str,
    fim_format: str,
    sentinels: str | FIMSentinels | None,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    context: RepoContext | None = None,
) -> str:
    """The middle a loaded model writes between ``prefix`` and ``suffix`` (``codetune infill`` and the API), with
    the repository's other files before it when ``context`` is given."""
    chosen = require_sentinels(tokenizer, sentinels)
    [middle] = generate_infills(
        model,
        tokenizer,
        [(prefix, suffix)],
        fim_format,
        chosen,
        max_new_tokens,
        temperature=temperature,
        seed=seed,
        contexts=[context],
    )
    return middle


def check_mode(mode: str) -> None:
    if mode not in MODES:
        only = " (random-span-light exists only as an official task set)" if mode in OFFICIAL_MODES else ""
        raise ValueError(
            f"unknown infilling mode {mode!r} for derived tasks: use one of {', '.join(MODES)}{only}"
        )


def check_format(fim_format: str) -> None:
    if fim_format not in FORMATS:
        raise ValueError(f"unknown FIM format {fim_format!r}: use psm or spm")
