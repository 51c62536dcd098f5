"""What a self-instruct run can be told, stage by stage (the recipe schema: jsonargparse reads these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from codetune.selfinstruct import prompts

STAGES = ("problems", "tests", "solutions")
Stage = Literal["problems", "tests", "solutions"]


@dataclass(frozen=True)
class Sampling:
    """How one stage samples from its model (the same settings go to every backend)."""

    temperature: float = 0.0
    """0 is greedy; several samples of one prompt need > 0."""
    top_p: float = 0.95
    """Nucleus sampling mass when sampling (ignored when greedy)."""
    max_new_tokens: int = 512
    """Generation budget per sample."""

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"bad sampling {self}: temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1")


@dataclass(frozen=True)
class ProblemGeneration:
    """Stage 1 from a model: numbered lists of problems (Code Llama asked Llama 2 70B for 50 at a time)."""

    model: str | None = None
    """Model that writes problems (exported folder, checkpoint or run dir); default: the run's ``model``."""
    batches: int = 1
    """Prompts sent (each sampled once, with its own seed); Code Llama's ~62,000 problems took ~1,250."""
    per_batch: int = 50
    """Problems each prompt asks for (its ``{n}``)."""
    prompt: str = prompts.PROBLEMS_PROMPT
    """Template with ``{n}``; the generated list is read item by item (``1. ...``)."""
    stop: tuple[str, ...] = prompts.PROBLEMS_STOP
    """Strings that end a list."""
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.8, max_new_tokens=2048))
    """Sampled, so batches differ."""


@dataclass(frozen=True)
class ProblemsFile:
    """Stage 1 from a file: a user's JSONL of problems, one object per line."""

    path: str
    """The JSONL file."""
    question_field: str = "question"
    """Key of the problem statement."""
    id_field: str | None = "id"
    """Key of a stable id (kept through every stage); lines without it get ``line-<n>``."""
    on_error: Literal["skip", "raise"] = "skip"
    """A malformed line: skipped, counted and named by line number, or an error."""


@dataclass(frozen=True)
class ProblemFilter:
    """Which problems survive stage 1: duplicates and evaluation-set look-alikes go (codetune.data.curation)."""

    exact_dedup: bool = True
    """Drop problems whose normalised statement was already seen."""
    near_dedup: bool = True
    """Drop near-duplicates (MinHash LSH over word shingles; needs ``datasketch``)."""
    near_dedup_threshold: float = 0.7
    """Estimated Jaccard similarity of shingle sets at or above which two statements are near-duplicates
    (checked: a changed last word, Jaccard 0.83, goes; "sum" -> "product" in one sentence, 0.64, stays)."""
    near_dedup_shingle: int = 2
    """Words per shingle: problem statements are one or two sentences, so shorter than for files (5)."""
    near_dedup_num_perm: int = 128
    """MinHash permutations."""
    decontaminate: bool = True
    """Drop problems (and, at the end, examples) sharing an n-gram with an evaluation set."""
    decontamination_sets: tuple[str, ...] = ("humaneval",)
    """``humaneval`` (the only eval set codetune ships; its infilling tasks are cut from the same solutions)
    and/or paths to JSONL(.gz) files of tasks (``prompt``/``canonical_solution``/``text``/``code`` fields)."""
    decontamination_ngram: int = 13
    """Shared whitespace-separated words that mark a text contaminated (GPT-3's 13-gram test)."""


@dataclass(frozen=True)
class UnitTestGeneration:
    """Stage 2: unit tests per problem, checked for syntax, assertions and vacuity."""

    prompt: str = prompts.TESTS_PROMPT
    """Template with ``{question}``."""
    stop: tuple[str, ...] = prompts.TESTS_STOP
    """Strings that end the tests."""
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, max_new_tokens=512))
    """Greedy by default: one set of tests per problem."""
    trivial_bodies: tuple[str, ...] = ("pass", "return None", "raise NotImplementedError")
    """Bodies of trivial solutions (``def f(*args, **kwargs): <body>``); tests one of them passes are vacuous."""


@dataclass(frozen=True)
class SolutionGeneration:
    """Stage 3: candidates per problem, run against its tests; the first passing one is kept."""

    candidates: int = 10
    """Samples per problem (Code Llama: ten)."""
    prompt: str = prompts.SOLUTION_PROMPT
    """Template with ``{question}`` and ``{test}`` (the first test case)."""
    stop: tuple[str, ...] = prompts.SOLUTION_STOP
    """Strings that end a solution."""
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.8, max_new_tokens=512))
    """Sampled (temperature > 0 is needed for more than one distinct candidate)."""


@dataclass(frozen=True)
class Execution:
    """How generated programs run (always in :class:`codetune.eval.sandbox.Sandbox`)."""

    timeout: float = 3.0
    """Wall-clock seconds per program."""
    memory_mb: int = 1024
    """Address-space limit per program, in MiB."""
    workers: int | None = None
    """Programs run at once (default: one per CPU core, at most 8)."""


@dataclass(frozen=True)
class Output:
    """The instruct data set written at the end."""

    include_tests: bool = False
    """Show the tests in the user turn (``Your code should pass these tests: ...``)."""
    fenced: bool = True
    """Answer with the solution in a ```python block (what ``codetune eval humaneval --chat`` reads back)."""
