"""MBPP (Austin et al. 2021) pass@k with the 3-shot prompt of the MBPP paper, as Code Llama reports it.

The prompt is the one the MBPP README gives and lm-evaluation-harness's ``mbpp`` task renders: three solved
prompting problems (task ids 2, 3 and 4 of the full file), then the problem to solve, each as

    You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:
    <blank line>
    {three asserts, one per line}
    [BEGIN]
    {code}
    [DONE]

joined by a blank line, the last one ending after ``[BEGIN]\\n``. Generation stops at ``[DONE]``. The program run
in the sandbox is ``completion + "\\n" + test setup + "\\n" + every assert of the problem``. Only the evaluation
split (task ids 11-510) is scored, so a prompting problem is never among the scored ones. Instruct models
(``chat=True``) get :func:`chat_user_message` in the tokenizer's chat template instead, zero-shot, and the code
of their reply is run.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codetune.eval.benchmarks import MBPP_FEWSHOT_IDS, MBPPProblem, evaluation_split, load_mbpp
from codetune.eval.generate import generate
from codetune.eval.humaneval import DEFAULT_SAMPLING_TEMPERATURE, extract_code
from codetune.eval.passk import mean_pass_at_k
from codetune.eval.sandbox import Sandbox

log = logging.getLogger(__name__)

TASK_TEMPLATE = (
    "You are an expert Python programmer, and here is your task: {text} "
    "Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
)
SOLUTION_TEMPLATE = "{code}\n[DONE]"
SHOT_SEPARATOR = "\n\n"
STOP_SEQUENCES = ("[DONE]",)
PROMPT_TESTS = 3
"""Asserts shown in a prompt: the paper's three (4 of the 257 scored sanitized problems have 4 or 5; all are run)."""
CHAT_TEMPLATE = "You are an expert Python programmer, and here is your task:\n{text}\nYour code should pass these tests:\n{tests}"

# MBPP task ids 2, 3 and 4 exactly as the full file (mbpp.jsonl) has them, \r\n line ends included: the
# sanitized file words them differently, and lm-evaluation-harness's `mbpp` prompts with these for both. A test
# checks them against the pinned file. MBPP is CC BY 4.0 (Austin et al. 2021).
FEWSHOT_PROBLEMS: tuple[MBPPProblem, ...] = (
    MBPPProblem(
        task_id=2,
        text="Write a function to find the similar elements from the given two tuple lists.",
        code="def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
        "  return (res) ",
        test_list=(
            "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
            "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
            "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
        ),
        test_setup="",
    ),
    MBPPProblem(
        task_id=3,
        text="Write a python function to identify non-prime numbers.",
        code="import math\r\ndef is_not_prime(n):\r\n    result = False\r\n"
        "    for i in range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n"
        "            result = True\r\n    return result",
        test_list=(
            "assert is_not_prime(2) == False",
            "assert is_not_prime(10) == True",
            "assert is_not_prime(35) == True",
        ),
        test_setup="",
    ),
    MBPPProblem(
        task_id=4,
        text="Write a function to find the largest integers from a given list of numbers using heap queue "
        "algorithm.",
        code="import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
        "  return largest_nums",
        test_list=(
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]",
        ),
        test_setup="",
    ),
)


def select_problems(
    variant: str = "sanitized", data_dir: str | Path | None = None, limit: int | None = None
) -> tuple[list[MBPPProblem], dict[str, Any]]:
    """The scored problems (evaluation split, first ``limit`` by task id) and what they are, for the results JSON.

    Cheap: call it before loading a model. ``sanitized``: 257 problems of the hand-verified file; ``full``: 500.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    task_set = load_mbpp(variant, data_dir)
    problems = evaluation_split(task_set.tasks)
    if limit is not None:
        problems = problems[:limit]
    meta = {
        "variant": variant,
        "task_set": task_set.meta(),
        "split": "task ids 11-510",
        "fewshot_task_ids": list(MBPP_FEWSHOT_IDS),
        "limit": limit,
    }
    return problems, meta


def task_text(problem: MBPPProblem) -> str:
    """One problem as the prompt states it, up to and including ``[BEGIN]\\n``."""
    tests = "\n".join(problem.test_list[:PROMPT_TESTS])
    return TASK_TEMPLATE.format(text=problem.text, tests=tests)


def build_prompt(problem: MBPPProblem, shots: Sequence[MBPPProblem] = FEWSHOT_PROBLEMS) -> str:
    """The 3-shot prompt for ``problem``: each shot's task and ``{code}\\n[DONE]``, then the problem's task."""
    if problem.task_id in {s.task_id for s in shots}:
        raise ValueError(f"MBPP task {problem.task_id} is a few-shot example; it cannot also be scored")
    solved = [task_text(s) + SOLUTION_TEMPLATE.format(code=s.code) for s in shots]
    return SHOT_SEPARATOR.join([*solved, task_text(problem)])


def chat_user_message(problem: MBPPProblem) -> str:
    """The user turn for instruct models (zero-shot; lm-evaluation-harness ``mbpp_instruct``'s wording)."""
    tests = "\n".join(problem.test_list[:PROMPT_TESTS])
    return CHAT_TEMPLATE.format(text=problem.text, tests=tests)


def chat_prompt(tokenizer: Any, problem: MBPPProblem) -> str:
    """:func:`chat_user_message` in ``tokenizer``'s chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat: the tokenizer has no chat template; evaluate base models without chat")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": chat_user_message(problem)}], tokenize=False, add_generation_prompt=True
    )


def build_program(problem: MBPPProblem, completion: str) -> str:
    """The program a completion is judged by: it, the test setup, then every assert; it passes if it runs to the end.

    One program, as the published harnesses run MBPP: its asserts use the solution's own imports and classes and
    compare objects (``re.Match``, trees) that cannot cross between processes, so MBPP cannot be split into a
    solution and a separate tests process as HumanEval and infilling are. A completion written to forge a pass
    (objects equal to anything) can therefore pass MBPP; docs/evaluation.md says so."""
    return f"{completion}\n{problem.test_setup}\n" + "\n".join(problem.test_list) + "\n"


def score_completions(
    problems: Sequence[MBPPProblem], completions: dict[int, list[str]], ks: Sequence[int], sandbox: Sandbox
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Execute every completion in the sandbox; returns pass@k over ``problems`` and one record per sample."""
    by_id = {p.task_id: p for p in problems}
    unknown = sorted(set(completions) - set(by_id))
    if unknown:
        raise ValueError(f"completions for MBPP tasks {unknown[:3]} that are not among the scored problems")
    missing = [p.task_id for p in problems if not completions.get(p.task_id)]
    if missing:
        raise ValueError(
            f"no completion for {len(missing)} of {len(problems)} MBPP problems (e.g. {missing[0]})"
        )
    jobs = [(p.task_id, i, c) for p in problems for i, c in enumerate(completions[p.task_id])]
    results = sandbox.run_many([build_program(by_id[t], c) for t, _, c in jobs])
    records = [
        {"task_id": t, "sample": i, "completion": c, "passed": r.passed, "result": r.result}
        for (t, i, c), r in zip(jobs, results, strict=True)
    ]
    correct: dict[int, int] = defaultdict(int)
    for rec in records:
        correct[rec["task_id"]] += rec["passed"]
    counts = [(len(completions[p.task_id]), correct[p.task_id]) for p in problems]
    return mean_pass_at_k(counts, ks), records


def run_mbpp(
    model: Any,
    tokenizer: Any,
    problems: Sequence[MBPPProblem],
    n: int = 1,
    k: Sequence[int] = (1,),
    temperature: float | None = None,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    chat: bool = False,
    sandbox: Sandbox | None = None,
    task_meta: dict[str, Any] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, Any]]:
    """Generate ``n`` completions per problem (from :func:`select_problems`) with an in-memory model and score them.

    Greedy for ``n=1`` unless ``temperature`` is given; sampled at 0.8 / top-p 0.95 (Code Llama) for ``n>1``.
    Returns the pass@k scores, one record per sample and the run's meta (``task_meta`` plus the settings).
    """
    ks = sorted(set(k))
    if not problems:
        raise ValueError("no MBPP problems to score")
    if not ks or min(ks) < 1 or max(ks) > n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples per problem, got k={list(k)}, n={n}")
    if temperature is None:
        temperature = 0.0 if n == 1 else DEFAULT_SAMPLING_TEMPERATURE
    if chat:
        prompts = [chat_prompt(tokenizer, p) for p in problems]
        # The template holds any BOS already; the reply ends at the model's end-of-turn token.
        samples = generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            num_samples=n, batch_size=batch_size, seed=seed, add_special_tokens=False,
        )  # fmt: skip
        texts = [[extract_code(s.text) for s in ss] for ss in samples]
    else:
        samples = generate(
            model, tokenizer, [build_prompt(p) for p in problems], max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, num_samples=n, stop=STOP_SEQUENCES, batch_size=batch_size,
            seed=seed,
        )  # fmt: skip
        texts = [[s.text for s in ss] for ss in samples]
    sandbox = sandbox or Sandbox()
    completions = {p.task_id: t for p, t in zip(problems, texts, strict=True)}
    scores, records = score_completions(problems, completions, ks, sandbox)
    finished = [s.finish for ss in samples for s in ss]
    meta = {
        **(task_meta or {}),
        "num_tasks": len(problems),
        "num_samples": len(records),
        "settings": {
            "n": n,
            "k": ks,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "chat": chat,
            "seed": seed,
            "prompt": "chat zero-shot" if chat else "3-shot (Austin et al. 2021)",
        },
        # Samples cut by max_new_tokens rather than by [DONE] or the end of turn: many means the budget is short.
        "hit_length_limit": finished.count("length"),
        "sandbox": sandbox.report.as_dict(),
    }
    return scores, records, meta
