"""Stage 1's input: problems written by a model in numbered batches, or read from a user's JSONL file."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codetune.selfinstruct.backends import Backend, sample
from codetune.selfinstruct.prompts import cut_at_stop, numbered_items, render
from codetune.selfinstruct.provenance import clean_text, derive_seed, now, provenance
from codetune.selfinstruct.settings import ProblemGeneration, ProblemsFile
from codetune.selfinstruct.stage_log import StageLog

log = logging.getLogger(__name__)

# Turn separators of codetune's chat text form (codetune.data.chat): a question holding one cannot be trained on.
_CONTROL = ("\x1e", "\x1f")


@dataclass(frozen=True)
class Problem:
    """One problem statement and where it came from."""

    id: str
    question: str
    origin: dict[str, Any] = field(default_factory=dict)
    """``{"batch": b, "item": i}`` for generated problems, ``{"path": ..., "line": n}`` for a file's."""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FileReport:
    """What reading a problems file found: lines read, problems taken, bad lines by reason with line numbers."""

    path: str
    lines: int = 0
    problems: int = 0
    bad_lines: dict[str, list[int]] = field(default_factory=dict)

    @property
    def malformed(self) -> int:
        return sum(len(v) for v in self.bad_lines.values())

    def summary(self) -> str:
        parts = [
            f"{reason} at line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:10]))}"
            + (f" (+{len(lines) - 10} more)" if len(lines) > 10 else "")
            for reason, lines in sorted(self.bad_lines.items())
        ]
        return "; ".join(parts) or "none"


def read_problems_file(spec: ProblemsFile) -> tuple[list[Problem], FileReport]:
    """The problems of a JSONL file; malformed lines are counted and named by line number (or raise)."""
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"problems_file.path {spec.path}: no such file")
    report = FileReport(str(path))
    problems: list[Problem] = []
    seen: set[str] = set()

    def bad(reason: str, lineno: int, message: str) -> None:
        if spec.on_error == "raise":
            raise ValueError(f"{path}:{lineno}: {message}; fix or delete the line, or set on_error: skip")
        report.bad_lines.setdefault(reason, []).append(lineno)

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        report.lines += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            bad("malformed_json", lineno, f"malformed JSON ({err.msg}, column {err.colno})")
            continue
        if not isinstance(record, dict):
            bad("not_an_object", lineno, f"expected a JSON object, got {type(record).__name__}")
            continue
        question = record.get(spec.question_field)
        if not isinstance(question, str) or not question.strip():
            bad("no_question", lineno, f"no non-empty string {spec.question_field!r}")
            continue
        if any(c in question for c in _CONTROL):
            bad("control_character", lineno, "the question holds a U+001E/U+001F control character")
            continue
        raw_id = record.get(spec.id_field) if spec.id_field else None
        problem_id = str(raw_id) if raw_id is not None else f"line-{lineno}"
        if problem_id in seen:
            bad("duplicate_id", lineno, f"id {problem_id!r} was used on an earlier line")
            continue
        seen.add(problem_id)
        problems.append(Problem(problem_id, question.strip(), {"path": str(path), "line": lineno}))
    report.problems = len(problems)
    if not problems:
        raise ValueError(f"{path}: no usable problems ({report.summary()})")
    if report.malformed:
        log.warning("%s: %d malformed lines skipped: %s", path, report.malformed, report.summary())
    return problems, report


def batch_problems(record: dict[str, Any]) -> list[Problem]:
    """The problems of one generated batch record (ids ``gen-<batch>-<item>``, stable across reruns)."""
    batch = int(record["batch"])
    return [
        Problem(f"gen-{batch}-{i}", q, {"batch": batch, "item": i}) for i, q in enumerate(record["problems"])
    ]


def prompt_examples(generation: ProblemGeneration) -> list[str]:
    """The worked items of the problems prompt (a model that repeats them adds nothing new)."""
    return numbered_items(render(generation.prompt, n=generation.per_batch))


def generate_batches(
    log_: StageLog,
    backend: Backend,
    generation: ProblemGeneration,
    seed: int,
    chunk_size: int,
) -> int:
    """Generate the batches ``log_`` lacks, ``chunk_size`` prompts per call; returns how many were made."""
    prompt = render(generation.prompt, n=generation.per_batch)
    first = len(numbered_items(prompt)) + 1  # the list continues after the prompt's worked items
    todo = [b for b in range(generation.batches) if str(b) not in log_]
    made = 0
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        started = now()
        chunk_seed = derive_seed(seed, "problems", str(chunk[0]))
        # One prompt sampled len(chunk) times, not len(chunk) copies of it: a backend seeding each request alike
        # (vLLM's per-request seed) would otherwise write the same list for every batch of the chunk.
        (samples,) = sample(backend, [prompt], generation.sampling, len(chunk), generation.stop, chunk_seed)
        generated = now()
        records = []
        for batch, draw in zip(chunk, samples, strict=True):
            text = clean_text(cut_at_stop(draw.text, generation.stop))
            questions = [q for q in numbered_items(text, start=first) if not any(c in q for c in _CONTROL)]
            records.append(
                {
                    "batch": batch,
                    "problems": questions,
                    "text": text,
                    "finish": draw.finish,
                    "prompt": prompt,
                    "provenance": provenance(backend, generation.sampling, chunk_seed, started, generated),
                }
            )
        log_.append(records)
        made += len(records)
        log.info("selfinstruct problems: %d/%d batches", len(log_), generation.batches)
    return made
