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

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from codetune.data.tokenizer import SENTINEL_SETS, FIMSentinels, carried_sentinel_sets, resolve_sentinels
from codetune.eval.benchmarks import INFILLING_FILES, InfillTask, load_infilling_tasks
from codetune.eval.humaneval import load_problems
from codetune.eval.results import write_results
from codetune.eval.sandbox import Sandbox, SandboxLimits

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
    _check_mode(mode)
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
    _check_mode(mode)
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
    """The program an infill is judged by, exactly as human-eval-infilling's ``check_correctness`` builds it."""
    return f"{task.prefix}{middle}{task.suffix}\n{task.test}\ncheck({task.entry_point})"


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
    results = sandbox.run_many([build_program(t, m) for t, m in zip(tasks, middles, strict=True)])
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


def require_sentinels(tokenizer: Any, sentinels: str | FIMSentinels | None) -> FIMSentinels:
    """The sentinel set to infill with; every one of its tokens must be a single token of ``tokenizer``.

    ``None`` picks the one known set the tokenizer fully carries.
    """
    vocab = tokenizer.get_vocab()
    if sentinels is None:
        present = carried_sentinel_sets(vocab)
        if len(present) == 1:
            return SENTINEL_SETS[present[0]]
        if len(present) > 1:
            # codetune adds the sentinels it trains with after the base's own vocabulary: the set with the
            # highest ids is the one this model was fine-tuned with (e.g. `codellama` added to a Code Llama
            # tokenizer that also has its own `codellama-hf` spelling).
            newest = max(present, key=lambda n: min(vocab[t] for t in SENTINEL_SETS[n].tokens()))
            log.info("tokenizer carries FIM sentinel sets %s; using %s, the one added last", present, newest)
            return SENTINEL_SETS[newest]
        sentinels = "codellama"
    chosen = resolve_sentinels(sentinels)
    missing = [t for t in (chosen.prefix, chosen.suffix, chosen.middle, chosen.end) if t not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer has no FIM sentinel tokens {missing} (set {sentinels!r}); infilling needs a model "
            "fine-tuned with FIM (its tokenizer then carries them) or --sentinels naming the set it was trained with"
        )
    return chosen


def build_infill_prompts(
    tokenizer: Any, pieces: Sequence[tuple[str, str]], fim_format: str, sentinels: FIMSentinels
) -> tuple[list[list[int]], Any]:
    """Token ids of infilling prompts for (prefix, suffix) pairs, encoded by the training FIM code.

    Returns the ids and the :class:`~codetune.data.fim.FIMTransform` (for the end sentinel and decoding).
    """
    from codetune.data.fim import FIMConfig, FIMTransform

    _check_format(fim_format)
    transform = FIMTransform(FIMConfig(sentinels=sentinels), tokenizer)
    return [transform.encode_infill_prompt(p, s, fim_format) for p, s in pieces], transform


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
) -> list[str]:
    """One generated middle per (prefix, suffix), stopping at the end-of-middle sentinel."""
    from codetune.eval.generate import generate

    prompts, transform = build_infill_prompts(tokenizer, pieces, fim_format, sentinels)
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
    _check_format(fim_format)
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


# -- entry points -----------------------------------------------------------------------------------------


def evaluate_infilling(
    model: str,
    mode: InfillMode = "single-line",
    format: Literal["psm", "spm"] = "psm",
    sentinels: str | None = None,
    limit: int | None = None,
    per_problem: int = 1,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    out_dir: str | None = None,
    seed: int = 0,
    timeout: float = 3.0,
    workers: int | None = None,
) -> dict[str, Any]:
    """HumanEval infilling of a model on tasks derived from HumanEval: execution pass@1 and exact match of greedy infills.

    Args:
        model: Exported Hugging Face folder, training checkpoint (``.ckpt``) or run directory.
        mode: ``single-line``, ``multi-line`` or ``random-span``.
        format: FIM layout of the prompt, ``psm`` or ``spm`` (as in training).
        sentinels: FIM sentinel set (``codellama``, ``codellama-hf``, ``starcoder``); default: the one the tokenizer carries.
        limit: Only the first ``limit`` HumanEval problems.
        per_problem: Tasks per problem (distinct gaps).
        max_new_tokens: Generation budget per infill.
        batch_size: Prompts per generation batch.
        out_dir: Where ``infilling_results.json`` (and per-sample JSONL) go. Default: ``eval/infilling`` inside the run
            when ``model`` is a codetune run or checkpoint (``codetune export`` puts them in the model card), else
            ``./eval/infilling``.
        seed: Seed of the task derivation.
        timeout: Wall-clock seconds per program in the sandbox.
        workers: Parallel sandbox processes (default: one per CPU core).
    """
    _check_format(format)
    tasks, task_meta = select_tasks("derived", mode, limit=limit, seed=seed, per_problem=per_problem)
    sandbox = Sandbox(SandboxLimits(timeout=timeout), workers=workers)
    from codetune.checkpoints import load_for_inference

    started = time.monotonic()
    model_obj, tokenizer = load_for_inference(model)
    scores, records, meta = run_infilling(
        model_obj, tokenizer, tasks, format, sentinels, max_new_tokens, batch_size, seed, sandbox, task_meta
    )
    results = {
        "benchmark": f"humaneval-infilling-{mode}",
        "scores": scores,
        "num_tasks": len(records),
        "model": model,
        "seed": seed,
        "settings": {
            "mode": mode,
            "format": format,
            "sentinels": meta["sentinels"],
            "limit": limit,
            "per_problem": per_problem,
            "max_new_tokens": max_new_tokens,
            "timeout": timeout,
        },
        "sandbox": sandbox.report.as_dict(),
        "seconds": time.monotonic() - started,
    }
    write_results(out_dir, "infilling", results, records)
    log.info("infilling %s/%s: %s on %d tasks", mode, format, scores, len(records))
    return results


def infill(
    model: str,
    prefix: str,
    suffix: str,
    format: Literal["psm", "spm"] = "psm",
    sentinels: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """Fill in the code between the contents of the ``prefix`` and ``suffix`` files; returns the middle.

    Uses the same prompt layout and stopping as the infilling eval, for a quick look at a model.

    Args:
        model: Exported Hugging Face folder, training checkpoint (``.ckpt``) or run directory.
        prefix: File with the code before the gap.
        suffix: File with the code after the gap.
        format: FIM layout of the prompt, ``psm`` or ``spm`` (as in training).
        sentinels: FIM sentinel set (``codellama``, ``codellama-hf``, ``starcoder``); default: the one the tokenizer carries.
        max_new_tokens: Generation budget for the middle.
        temperature: Sampling temperature; 0 is greedy.
        seed: Seed of the sampling.
    """
    _check_format(format)
    texts = []
    for name, path in (("prefix", prefix), ("suffix", suffix)):
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"--{name} {path}: no such file")
        texts.append(file.read_text())
    from codetune.checkpoints import load_for_inference

    model_obj, tokenizer = load_for_inference(model)
    return infill_one(model_obj, tokenizer, *texts, format, sentinels, max_new_tokens, temperature, seed)


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
) -> str:
    """The middle a loaded model writes between ``prefix`` and ``suffix`` (``codetune infill`` and the API)."""
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
    )
    return middle


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        only = " (random-span-light exists only as an official task set)" if mode in OFFICIAL_MODES else ""
        raise ValueError(
            f"unknown infilling mode {mode!r} for derived tasks: use one of {', '.join(MODES)}{only}"
        )


def _check_format(fim_format: str) -> None:
    if fim_format not in FORMATS:
        raise ValueError(f"unknown FIM format {fim_format!r}: use psm or spm")
