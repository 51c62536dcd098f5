"""``codetune selfinstruct``: generate coding problems, unit tests and solutions; keep what passes its own tests.

Code Llama - Instruct's self-instruct set (Rozière et al. 2023 §2.5), at any scale: see docs/selfinstruct.md.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from codetune.selfinstruct import pipeline
from codetune.selfinstruct.backends import BackendKind, load_backend
from codetune.selfinstruct.settings import (
    STAGES,
    Execution,
    Output,
    ProblemFilter,
    ProblemGeneration,
    ProblemsFile,
    SolutionGeneration,
    Stage,
    UnitTestGeneration,
)


def selfinstruct(
    out_dir: str,
    model: str | None = None,
    stages: tuple[Stage, ...] = STAGES,
    problems_file: ProblemsFile | None = None,
    problems: ProblemGeneration = ProblemGeneration(),  # noqa: B008  (frozen: a shared default is safe)
    filtering: ProblemFilter = ProblemFilter(),  # noqa: B008
    tests: UnitTestGeneration = UnitTestGeneration(),  # noqa: B008
    solutions: SolutionGeneration = SolutionGeneration(),  # noqa: B008
    execution: Execution = Execution(),  # noqa: B008
    output: Output = Output(),  # noqa: B008
    backend: BackendKind = "transformers",
    batch_size: int = 8,
    device: str = "auto",
    vllm_options: dict[str, Any] | None = None,
    seed: int = 0,
    plot: bool = True,
) -> dict[str, Any]:
    """Generate coding problems, unit tests and solutions; keep the first solution that passes its tests.

    Stages run in order and resume: rerunning the same command continues where a crashed run stopped.
    Generated code runs only in codetune's sandbox; the run refuses to start where it cannot be set up.

    Args:
        out_dir: Folder of the stage logs, the instruct data (selfinstruct.jsonl) and the report.
        model: Model that writes tests and solutions (and problems, unless problems.model is set): an exported
            folder, a training checkpoint or a run directory.
        stages: Stages to run now (problems, tests, solutions); later stages read earlier ones' files in out_dir.
        problems_file: Read problems from a JSONL file instead of generating them.
        problems: How problems are generated (model, batches, per_batch, prompt, sampling).
        filtering: Dedup and decontamination of problems (and of the kept examples).
        tests: How unit tests are generated, and the trivial solutions that expose vacuous ones.
        solutions: How many candidates per problem and how they are sampled.
        execution: Sandbox limits per program (timeout, memory_mb, workers).
        output: What the instruct examples look like (tests in the question, fenced code).
        backend: transformers (CPU/GPU), vllm (GPU, pip install 'codetune[vllm]', exported folders) or auto.
        batch_size: Problems per generation call (and per sandbox round).
        device: transformers backend: cuda, cpu or auto.
        vllm_options: Extra keyword arguments of vllm.LLM (e.g. {tensor_parallel_size: 2, dtype: bfloat16}).
        seed: Seed of every sampling call (each call's seed is derived from it and the items it covers).
        plot: Draw the histogram of passing candidates per problem (needs matplotlib).

    Returns:
        The report, also written to out_dir/report.json.
    """
    plan = pipeline.Plan(
        out_dir=Path(out_dir).expanduser(),
        stages=tuple(stages),
        model=model,
        problems_file=problems_file,
        generation=problems,
        filter=filtering,
        tests=tests,
        solutions=solutions,
        execution=execution,
        output=output,
        backend=backend,
        seed=seed,
        chunk_size=batch_size,
        plot=plot,
    )
    make = partial(
        load_backend, backend, batch_size=batch_size, device=device, seed=seed, vllm_options=vllm_options
    )
    return pipeline.run(plan, make)


if (
    __name__ == "__main__"
):  # until `codetune selfinstruct` is registered: python -m codetune.commands.selfinstruct
    import logging

    from jsonargparse import CLI, set_parsing_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    CLI(selfinstruct, as_positional=False, prog="codetune selfinstruct")
