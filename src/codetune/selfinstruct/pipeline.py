"""A self-instruct run end to end: check everything cheap, set up the sandbox, load models, run the stages.

Order matters: arguments, the problems file and the stage logs' settings are checked first (no model loaded),
then the sandbox is set up (refused runs execute nothing), then each model is loaded and made to generate one
token, and only then does any stage start. Everything goes into ``out_dir``:

==============================  ===================================================================
``problem_batches.jsonl``       stage 1 from a model: one record per generated batch (append-only)
``problems.jsonl``              the problems kept after dedup and decontamination (rewritten whole)
``problems.summary.json``       what stage 1 read and removed
``tests.jsonl``                 stage 2: one record per problem (append-only)
``solutions.jsonl``             stage 3: one record per problem with usable tests (append-only)
``<stage>.settings.json``       how each log was made; continuing with other settings is refused
``selfinstruct.jsonl``          the instruct data set (chat JSONL)
``report.json``                 the counts (:mod:`codetune.selfinstruct.report`)
``passing_per_problem.png``     the histogram of passing candidates per problem
==============================  ===================================================================
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from codetune.selfinstruct.backends import Backend
from codetune.selfinstruct.execution import open_sandbox, sandbox_report
from codetune.selfinstruct.filtering import check_filter, example_decontaminator, filter_problems
from codetune.selfinstruct.output import build_examples, write_examples
from codetune.selfinstruct.problems import (
    Problem,
    batch_problems,
    generate_batches,
    prompt_examples,
    read_problems_file,
)
from codetune.selfinstruct.prompts import check_template
from codetune.selfinstruct.provenance import now
from codetune.selfinstruct.report import plot_histogram, print_table, solutions_summary, tests_summary
from codetune.selfinstruct.settings import (
    STAGES,
    Execution,
    Output,
    ProblemFilter,
    ProblemGeneration,
    ProblemsFile,
    SolutionGeneration,
    UnitTestGeneration,
)
from codetune.selfinstruct.stage_log import StageLog
from codetune.selfinstruct.stages import run_solutions_stage, run_tests_stage
from codetune.storage import atomic_write

log = logging.getLogger(__name__)

BATCHES_FILE = "problem_batches.jsonl"
PROBLEMS_FILE = "problems.jsonl"
PROBLEMS_SUMMARY_FILE = "problems.summary.json"
TESTS_FILE = "tests.jsonl"
SOLUTIONS_FILE = "solutions.jsonl"
EXAMPLES_FILE = "selfinstruct.jsonl"
REPORT_FILE = "report.json"
PLOT_FILE = "passing_per_problem.png"


@dataclass(frozen=True)
class Plan:
    """Everything one run is told (the command's arguments, checked)."""

    out_dir: Path
    stages: tuple[str, ...] = STAGES
    model: str | None = None
    problems_file: ProblemsFile | None = None
    generation: ProblemGeneration = field(default_factory=ProblemGeneration)
    filter: ProblemFilter = field(default_factory=ProblemFilter)
    tests: UnitTestGeneration = field(default_factory=UnitTestGeneration)
    solutions: SolutionGeneration = field(default_factory=SolutionGeneration)
    execution: Execution = field(default_factory=Execution)
    output: Output = field(default_factory=Output)
    backend: str = "transformers"
    seed: int = 0
    chunk_size: int = 8
    plot: bool = True

    @property
    def problems_model(self) -> str | None:
        return self.generation.model or self.model


def check_plan(plan: Plan) -> Plan:
    """One clear line for each argument that cannot work, before anything is read or loaded."""
    unknown = [s for s in plan.stages if s not in STAGES]
    if unknown or not plan.stages:
        raise ValueError(f"stages {list(plan.stages)}: choose among {list(STAGES)}")
    stages = tuple(s for s in STAGES if s in plan.stages)  # always in pipeline order
    out = plan.out_dir
    if "problems" in stages and plan.problems_file is None and plan.problems_model is None:
        raise ValueError(
            "the problems stage needs problems_file (a JSONL of problems) or a model to write them"
        )
    if ("tests" in stages or "solutions" in stages) and plan.model is None:
        raise ValueError(
            "the tests and solutions stages need model (the model that writes tests and solutions)"
        )
    if "problems" not in stages and not (out / PROBLEMS_FILE).is_file():
        raise ValueError(
            f"{out / PROBLEMS_FILE} does not exist: run the problems stage first (stages: [problems])"
        )
    if "solutions" in stages and "tests" not in stages and not (out / TESTS_FILE).is_file():
        raise ValueError(f"{out / TESTS_FILE} does not exist: run the tests stage first (stages: [tests])")
    if plan.chunk_size < 1 or plan.generation.batches < 1 or plan.generation.per_batch < 1:
        raise ValueError("chunk_size, problems.batches and problems.per_batch must be >= 1")
    if plan.solutions.candidates < 1:
        raise ValueError(f"solutions.candidates must be >= 1, got {plan.solutions.candidates}")
    if plan.solutions.candidates > 1 and plan.solutions.sampling.temperature == 0:
        raise ValueError(
            f"solutions.candidates={plan.solutions.candidates} with temperature 0 would sample the same solution "
            f"{plan.solutions.candidates} times: set solutions.sampling.temperature > 0 (Code Llama-style: 0.8)"
        )
    check_template(plan.generation.prompt, ["n"], "problems.prompt")
    check_template(plan.tests.prompt, ["question"], "tests.prompt")
    check_template(plan.solutions.prompt, ["question"], "solutions.prompt")
    if not plan.tests.trivial_bodies:
        log.warning("tests.trivial_bodies is empty: vacuous tests will not be detected")
    return replace(plan, stages=stages)


def _limits(plan: Plan) -> dict[str, Any]:
    return {"timeout": plan.execution.timeout, "memory_mb": plan.execution.memory_mb}


def batches_settings(plan: Plan) -> dict[str, Any]:
    g = plan.generation
    return {"model": plan.problems_model, "backend": plan.backend, "prompt": g.prompt, "per_batch": g.per_batch,
            "stop": g.stop, "sampling": asdict(g.sampling), "seed": plan.seed}  # fmt: skip


def tests_settings(plan: Plan) -> dict[str, Any]:
    t = plan.tests
    return {"model": plan.model, "backend": plan.backend, "prompt": t.prompt, "stop": t.stop,
            "sampling": asdict(t.sampling), "trivial_bodies": t.trivial_bodies, "seed": plan.seed,
            **_limits(plan)}  # fmt: skip


def solutions_settings(plan: Plan) -> dict[str, Any]:
    s = plan.solutions
    return {"model": plan.model, "backend": plan.backend, "prompt": s.prompt, "stop": s.stop,
            "sampling": asdict(s.sampling), "candidates": s.candidates, "seed": plan.seed,
            **_limits(plan)}  # fmt: skip


def read_problems(path: Path) -> list[Problem]:
    problems = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                problems.append(Problem(**json.loads(line)))
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"{path}:{lineno}: not a problem record ({err}); rerun the problems stage"
                ) from None
    return problems


def run(plan: Plan, make_backend: Callable[[str], Backend]) -> dict[str, Any]:
    """Run ``plan``'s stages; ``make_backend(model)`` loads a ready backend. Returns the report (also written)."""
    plan = check_plan(plan)
    out, stages = plan.out_dir, plan.stages
    started, clock = now(), time.monotonic()
    timings: dict[str, float] = {}

    # Cheap checks: the user's file, the dedup tools, the logs' settings. Nothing is loaded yet.
    from_file = (
        read_problems_file(plan.problems_file) if "problems" in stages and plan.problems_file else None
    )
    generating = "problems" in stages and from_file is None
    if "problems" in stages:
        check_filter(plan.filter)
    decontaminator = example_decontaminator(plan.filter)
    batches_log = StageLog(out / BATCHES_FILE, "batch", batches_settings(plan)) if generating else None
    tests_log = StageLog(out / TESTS_FILE, "id", tests_settings(plan) if "tests" in stages else None)
    solutions_log = StageLog(
        out / SOLUTIONS_FILE, "id", solutions_settings(plan) if "solutions" in stages else None
    )

    # The sandbox before any model: a machine that cannot confine generated code generates none.
    sandbox = open_sandbox(plan.execution) if {"tests", "solutions"} & set(stages) else None
    loaded: dict[str, Backend] = {}

    def backend_for(model: str) -> Backend:
        if model not in loaded:
            loaded[model] = make_backend(model)
        return loaded[model]

    problems_backend = backend_for(plan.problems_model) if generating else None
    solver = backend_for(plan.model) if {"tests", "solutions"} & set(stages) else None
    out.mkdir(parents=True, exist_ok=True)

    if "problems" in stages:
        t = time.monotonic()
        if from_file is not None:
            problems, file_report = from_file
            source = {"kind": "file", "path": file_report.path, "lines": file_report.lines,
                      "problems": file_report.problems, "malformed": file_report.malformed,
                      "bad_lines": file_report.bad_lines}  # fmt: skip
            examples: list[str] = []
        else:
            generate_batches(batches_log, problems_backend, plan.generation, plan.seed, plan.chunk_size)
            records = [batches_log.records[str(b)] for b in range(plan.generation.batches)]
            problems = [p for r in records for p in batch_problems(r)]
            source = {"kind": "generated", "model": plan.problems_model, "batches": len(records),
                      "batches_without_problems": sum(not r["problems"] for r in records),
                      "problems": len(problems)}  # fmt: skip
            examples = prompt_examples(plan.generation)
        kept, summary = filter_problems(problems, plan.filter, examples)
        atomic_write(out / PROBLEMS_FILE, "".join(json.dumps(p.as_json()) + "\n" for p in kept))
        atomic_write(out / PROBLEMS_SUMMARY_FILE, json.dumps({"source": source, **summary}, indent=2) + "\n")
        timings["problems"] = time.monotonic() - t
    kept = read_problems(out / PROBLEMS_FILE)
    summary_path = out / PROBLEMS_SUMMARY_FILE
    problems_summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}

    if "tests" in stages:
        t = time.monotonic()
        run_tests_stage(kept, tests_log, solver, plan.tests, sandbox, plan.seed, plan.chunk_size)
        timings["tests"] = time.monotonic() - t
    if "solutions" in stages:
        t = time.monotonic()
        run_solutions_stage(kept, tests_log, solutions_log, solver, plan.solutions, sandbox, plan.seed,
                            plan.chunk_size)  # fmt: skip
        timings["solutions"] = time.monotonic() - t

    examples_out, dropped = build_examples(kept, tests_log, solutions_log, plan.output, decontaminator)
    write_examples(out / EXAMPLES_FILE, examples_out)
    solutions = solutions_summary(kept, tests_log, solutions_log, plan.solutions.candidates)
    report: dict[str, Any] = {
        "out_dir": str(out),
        "stages_run": list(stages),
        "started": started,
        "finished": None,
        "seconds": timings,
        "problems": problems_summary,
        "tests": tests_summary(kept, tests_log),
        "solutions": solutions,
        "examples": {"kept": len(examples_out), "path": str(out / EXAMPLES_FILE), "dropped": dropped},
        "sandbox": sandbox_report(sandbox) if sandbox is not None else None,
        "resumed": {
            "partial_lines_dropped": [
                str(lg.path)
                for lg in (batches_log, tests_log, solutions_log)
                if lg and lg.dropped_partial_line
            ]
        },
    }
    report["plot"] = plot_histogram(solutions["passing_histogram"], out / PLOT_FILE) if plan.plot else None
    report["seconds"]["total"] = time.monotonic() - clock
    report["finished"] = now()
    atomic_write(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report
