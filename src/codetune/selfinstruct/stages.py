"""Stages 2 and 3: unit tests per problem, then candidate solutions run against them in the sandbox.

Both work through the problems ``chunk_size`` at a time: generate for the chunk, run what was generated in
the sandbox, append one record per problem to the stage's log. A rerun skips what the log holds, so a crash
costs at most the chunk in flight.

Tests (stage 2) are kept when they parse, hold an assert and fail every trivial solution; stage 3 samples
``candidates`` solutions per problem with usable tests (Code Llama: ten), runs each against the tests and
records every outcome; the first candidate that passes is the one kept (``kept``, its index).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from codetune.eval.sandbox import Sandbox
from codetune.selfinstruct.backends import Backend, sample
from codetune.selfinstruct.execution import run_programs
from codetune.selfinstruct.problems import Problem
from codetune.selfinstruct.prompts import cut_at_stop, render, solution_code, tests_code
from codetune.selfinstruct.provenance import clean_text, derive_seed, now, provenance
from codetune.selfinstruct.settings import SolutionGeneration, UnitTestGeneration
from codetune.selfinstruct.stage_log import StageLog
from codetune.selfinstruct.testcases import (
    TestSuite,
    candidate_program,
    failed_cases,
    parse_tests,
    trivial_program,
)

log = logging.getLogger(__name__)

USABLE = "ok"
"""Status of tests that parse, assert something and fail every trivial solution."""


def _chunks(items: Sequence[Problem], size: int) -> Iterator[list[Problem]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def check_same_questions(log_: StageLog, problems: Sequence[Problem]) -> None:
    """Refuse a log whose record for an id was made for another question (the problems changed under it)."""
    for p in problems:
        record = log_.records.get(p.id)
        if record is not None and record.get("question") != p.question:
            raise ValueError(
                f"{log_.path}: {p.id!r} was made for another question ({str(record.get('question'))[:60]!r}); "
                "the problems changed since: use a new out_dir"
            )


def run_tests_stage(
    problems: Sequence[Problem],
    log_: StageLog,
    backend: Backend,
    config: UnitTestGeneration,
    sandbox: Sandbox,
    seed: int,
    chunk_size: int,
) -> int:
    """Write tests for the problems ``log_`` lacks; returns how many problems were done now."""
    check_same_questions(log_, problems)
    todo = [p for p in problems if p.id not in log_]
    for chunk in _chunks(todo, chunk_size):
        started = now()
        prompts = [render(config.prompt, question=p.question) for p in chunk]
        chunk_seed = derive_seed(seed, "tests", chunk[0].id)
        samples = sample(backend, prompts, config.sampling, 1, config.stop, chunk_seed)
        generated = now()
        records: list[dict[str, Any]] = []
        programs: list[str] = []
        owners: list[tuple[int, str]] = []
        for p, prompt, (draw,) in zip(chunk, prompts, samples, strict=True):
            text = clean_text(cut_at_stop(draw.text, config.stop))
            suite, status, detail = parse_tests(tests_code(text))
            records.append(
                {
                    "id": p.id,
                    "question": p.question,
                    "status": status,
                    "detail": detail,
                    "tests": suite.source if suite else tests_code(text),
                    "cases": len(suite.cases) if suite else 0,
                    "entry_points": list(suite.entry_points) if suite else [],
                    "trivial": [],
                    "text": text,
                    "finish": draw.finish,
                    "prompt": prompt,
                    "provenance": provenance(backend, config.sampling, chunk_seed, started, generated),
                }
            )
            if suite is not None:
                for body in config.trivial_bodies:
                    programs.append(trivial_program(suite, body))
                    owners.append((len(records) - 1, body))
        for (index, body), outcome in zip(owners, run_programs(sandbox, programs), strict=True):
            record = records[index]
            record["trivial"].append({"body": body, "passed": outcome.passed, "result": outcome.result})
            if outcome.passed and record["status"] == USABLE:
                record["status"] = "vacuous"
                record["detail"] = f"a trivial solution ({body}) passes them"
        log_.append(records)
        log.info("selfinstruct tests: %d/%d problems", len(log_), len(problems))
    return len(todo)


def run_solutions_stage(
    problems: Sequence[Problem],
    tests_log: StageLog,
    log_: StageLog,
    backend: Backend,
    config: SolutionGeneration,
    sandbox: Sandbox,
    seed: int,
    chunk_size: int,
) -> int:
    """Sample and judge candidates for the problems with usable tests that ``log_`` lacks; returns how many."""
    check_same_questions(log_, problems)
    usable = [p for p in problems if tests_log.records.get(p.id, {}).get("status") == USABLE]
    todo = [p for p in usable if p.id not in log_]
    for chunk in _chunks(todo, chunk_size):
        started = now()
        suites: list[TestSuite] = []
        for p in chunk:
            suite, status, detail = parse_tests(tests_log.records[p.id]["tests"])
            if suite is None:  # it parsed when stage 2 judged it; a hand-edited tests.jsonl may not
                raise ValueError(f"{tests_log.path}: the tests of {p.id!r} no longer parse ({detail})")
            suites.append(suite)
        prompts = [
            render(config.prompt, question=p.question, test=s.first_test)
            for p, s in zip(chunk, suites, strict=True)
        ]
        chunk_seed = derive_seed(seed, "solutions", chunk[0].id)
        samples = sample(backend, prompts, config.sampling, config.candidates, config.stop, chunk_seed)
        generated = now()
        records: list[dict[str, Any]] = []
        programs: list[str] = []
        owners: list[tuple[int, int]] = []
        for p, prompt, suite, candidates in zip(chunk, prompts, suites, samples, strict=True):
            record = {
                "id": p.id,
                "question": p.question,
                "candidates": [],
                "passing": 0,
                "kept": None,
                "prompt": prompt,
                "provenance": provenance(backend, config.sampling, chunk_seed, started, generated),
            }
            for draw in candidates:
                text = clean_text(cut_at_stop(draw.text, config.stop))
                code = solution_code(text)
                record["candidates"].append(
                    {"text": text, "code": code, "finish": draw.finish, "executed": bool(code.strip()),
                     "passed": False, "result": "not run: empty solution", "failed_cases": None, "seconds": None}
                )  # fmt: skip
                if code.strip():
                    programs.append(candidate_program(code, suite))
                    owners.append((len(records), len(record["candidates"]) - 1))
            records.append(record)
        for (r, c), outcome in zip(owners, run_programs(sandbox, programs), strict=True):
            candidate = records[r]["candidates"][c]
            candidate.update(
                passed=outcome.passed,
                result=outcome.result,
                failed_cases=None if outcome.passed else failed_cases(outcome.result),
                seconds=outcome.seconds,
            )
        for record in records:
            passing = [i for i, c in enumerate(record["candidates"]) if c["passed"]]
            record["passing"] = len(passing)
            record["kept"] = passing[0] if passing else None  # Code Llama: the first that passes
            record["provenance"]["finished"] = now()
        log_.append(records)
        log.info("selfinstruct solutions: %d/%d problems", len(log_), len(usable))
    return len(todo)
