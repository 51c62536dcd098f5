"""The instruct data set self-instruct produces: question -> the first passing solution, as chat JSONL.

Each line is ``{"id", "messages": [user, assistant], "tests"}``, which :class:`codetune.data.chat.ChatFiles`
reads as it is (extra keys are ignored), so the file drops into an instruct mix (docs/selfinstruct.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codetune.data.chat import check_messages
from codetune.data.curation import Decontaminator
from codetune.selfinstruct.problems import Problem
from codetune.selfinstruct.settings import Output
from codetune.selfinstruct.stage_log import StageLog
from codetune.storage import atomic_write

TESTS_LEAD = "Your code should pass these tests:"


def conversation(question: str, code: str, tests: str, output: Output) -> list[dict[str, str]]:
    """The user turn (the question, optionally its tests) and the assistant turn (the solution)."""
    user = (
        f"{question}\n\n{TESTS_LEAD}\n\n```python\n{tests.strip()}\n```" if output.include_tests else question
    )
    answer = f"```python\n{code.strip()}\n```" if output.fenced else code.strip()
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def build_examples(
    problems: Sequence[Problem],
    tests_log: StageLog,
    solutions_log: StageLog,
    output: Output,
    decontaminator: Decontaminator | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Examples in problem order, and what was dropped at this last step (contaminated, unusable)."""
    examples: list[dict[str, Any]] = []
    dropped: dict[str, list[str]] = {"contaminated": [], "unusable": []}
    for p in problems:
        record = solutions_log.records.get(p.id)
        if record is None or record.get("kept") is None:
            continue
        code = record["candidates"][record["kept"]]["code"]
        tests = tests_log.records[p.id]["tests"]
        messages = conversation(p.question, code, tests, output)
        if check_messages(messages) is not None:
            dropped["unusable"].append(p.id)
            continue
        task = decontaminator.match(f"{p.question}\n{code}\n{tests}") if decontaminator else None
        if task is not None:
            dropped["contaminated"].append(f"{p.id} ({task})")
            continue
        examples.append({"id": p.id, "messages": messages, "tests": tests})
    return examples, {k: {"count": len(v), "ids": v[:10]} for k, v in dropped.items()}


def write_examples(path: Path, examples: Sequence[dict[str, Any]]) -> Path:
    """The chat JSONL, written whole or not at all."""
    return atomic_write(path, "".join(json.dumps(e) + "\n" for e in examples))
