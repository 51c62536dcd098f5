"""MBPP: the 3-shot prompt as lm-evaluation-harness renders it, reference solutions pass, wrong ones fail,
prompting problems are never scored, and a tiny model runs the whole path."""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import pytest

from codetune.eval import mbpp
from codetune.eval.benchmarks import MBPP_FEWSHOT_IDS, load_mbpp
from codetune.eval.mbpp import (
    FEWSHOT_PROBLEMS,
    build_program,
    build_prompt,
    chat_user_message,
    run_mbpp,
    score_completions,
    select_problems,
)
from codetune.eval.sandbox import Sandbox, SandboxLimits
from tests.benchmark_data import data_dir

REPO = Path(__file__).resolve().parents[1]
SMOKE = 20
SLOW_REFERENCE = {123}  # amicable numbers up to 9,999: ~12 s in CPython here, past the 3 s limit
BROKEN_REFERENCE = {341}  # full file: `tuple({6, ..., 11})` is (8, 9, 10, 11, 6, 7) in CPython, not sorted

# lm-evaluation-harness lm_eval/tasks/mbpp/mbpp.yaml (doc_to_text, doc_to_target, target_delimiter "") and its
# default fewshot_delimiter "\n\n": the independent oracle of the prompt.
LM_EVAL_DOC_TO_TEXT = (
    "You are an expert Python programmer, and here is your task: {{text}} Your code should pass these tests:"
    "\n\n{{test_list[0]}}\n{{test_list[1]}}\n{{test_list[2]}}\n[BEGIN]\n"
)
LM_EVAL_FEWSHOT_TARGET = "{{code}}\n[DONE]"


def _lm_eval_prompt(problem) -> str:
    import jinja2

    env = jinja2.Environment(keep_trailing_newline=True)
    text, target = env.from_string(LM_EVAL_DOC_TO_TEXT), env.from_string(LM_EVAL_FEWSHOT_TARGET)

    def doc(p):
        return {"text": p.text, "code": p.code, "test_list": list(p.test_list)}

    shots = "\n\n".join(text.render(doc(s)) + target.render(doc(s)) for s in FEWSHOT_PROBLEMS)
    return shots + "\n\n" + text.render(doc(problem))


def _return_none(problem) -> str:
    """A wrong solution: every function the tests call, defined to return None."""
    defined = {n.name for n in ast.parse(problem.code).body if isinstance(n, ast.FunctionDef)}
    called = {
        n.func.id
        for t in problem.test_list
        for n in ast.walk(ast.parse(t))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    names = sorted(defined & called) or sorted(defined)
    return "\n".join(f"def {name}(*args, **kwargs):\n    return None\n" for name in names)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(timeout=3.0))


# -- the prompt -------------------------------------------------------------------------------------------


def test_fewshot_examples_are_tasks_2_3_4_of_the_full_file():
    full = {p.task_id: p for p in load_mbpp("full", data_dir()).tasks}
    assert tuple(p.task_id for p in FEWSHOT_PROBLEMS) == MBPP_FEWSHOT_IDS == (2, 3, 4)
    assert list(FEWSHOT_PROBLEMS) == [full[i] for i in MBPP_FEWSHOT_IDS]


@pytest.mark.parametrize("variant", ["sanitized", "full"])
def test_fewshot_examples_are_never_scored(variant):
    problems, meta = select_problems(variant, data_dir())
    scored = {p.task_id for p in problems}
    assert not scored & {p.task_id for p in FEWSHOT_PROBLEMS}
    assert min(scored) >= 11 and max(scored) <= 510 and meta["fewshot_task_ids"] == [2, 3, 4]
    # A prompting problem handed in anyway is refused rather than scored against its own solution.
    every = {p.task_id: p for p in load_mbpp(variant, data_dir()).tasks}
    with pytest.raises(ValueError, match="few-shot example"):
        build_prompt(every[2])


@pytest.mark.parametrize("variant", ["sanitized", "full"])
def test_prompt_is_lm_evaluation_harness_mbpp_prompt(variant):
    problems, _ = select_problems(variant, data_dir(), limit=SMOKE)
    for problem in problems:
        prompt = build_prompt(problem)
        assert prompt == _lm_eval_prompt(problem)
        assert prompt.endswith("[BEGIN]\n") and prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3


def test_chat_message_states_the_task_and_three_tests():
    problem = select_problems("sanitized", data_dir(), limit=1)[0][0]
    message = chat_user_message(problem)
    assert message.startswith("You are an expert Python programmer, and here is your task:\n" + problem.text)
    assert message.endswith("\n".join(problem.test_list[:3])) and "[BEGIN]" not in message


def test_docs_show_the_prompt_exactly_as_built():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import gen_mbpp_prompt
    finally:
        sys.path.remove(str(REPO / "docs"))
    page = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    assert page == gen_mbpp_prompt.render(page, data_dir()), "run `python docs/gen_mbpp_prompt.py`"
    shown = re.search(
        r"<!-- mbpp-prompt:start -->\n```text\n(.*?)```\n<!-- mbpp-prompt:end -->", page, re.S
    ).group(1)
    assert shown == build_prompt(select_problems("sanitized", data_dir(), limit=1)[0][0]).replace(
        "\r\n", "\n"
    )


# -- scoring ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sanitized", "full"])
def test_reference_solutions_pass_and_none_fails(variant, sandbox):
    problems = select_problems(variant, data_dir(), limit=SMOKE)[0]
    ok, records = score_completions(problems, {p.task_id: [p.code] for p in problems}, [1], sandbox)
    assert ok == {"pass@1": 1.0}, [r for r in records if not r["passed"]][:2]
    half = problems[: SMOKE // 2]
    bad, _ = score_completions(half, {p.task_id: [_return_none(p)] for p in half}, [1], sandbox)
    assert bad == {"pass@1": 0.0}


def test_pass_at_k_counts_samples_per_problem(sandbox):
    a, b = select_problems("sanitized", data_dir(), limit=2)[0]
    completions = {a.task_id: [a.code, _return_none(a)], b.task_id: [_return_none(b), "syntax error("]}
    scores, records = score_completions([a, b], completions, [1, 2], sandbox)
    # a: 1 of 2 correct (pass@1 1/2, pass@2 1); b: 0 of 2.
    assert scores == {"pass@1": 0.25, "pass@2": 0.5}
    assert [(r["task_id"], r["sample"], r["passed"]) for r in records] == [
        (a.task_id, 0, True), (a.task_id, 1, False), (b.task_id, 0, False), (b.task_id, 1, False),
    ]  # fmt: skip


def test_completions_must_cover_exactly_the_scored_problems(sandbox):
    a, b = select_problems("sanitized", data_dir(), limit=2)[0]
    with pytest.raises(ValueError, match=f"no completion for 1 of 2 MBPP problems \\(e.g. {b.task_id}\\)"):
        score_completions([a, b], {a.task_id: [a.code]}, [1], sandbox)
    with pytest.raises(ValueError, match="not among the scored problems"):
        score_completions([a], {a.task_id: [a.code], 2: ["x"]}, [1], sandbox)


def test_test_setup_runs_after_the_solution():
    problems = {p.task_id: p for p in load_mbpp("full", data_dir()).tasks}
    program = build_program(problems[367], "class Node: ...")
    assert program.index("class Node") < program.index("root = Node(1)") < program.index("assert ")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", ["sanitized", "full"])
def test_every_reference_solution_passes(variant, sandbox):
    if variant == "full" and os.environ.get("CODETUNE_FULL_BENCHMARK_CHECK") != "1":
        pytest.skip("the 500 full-file problems (~40 s on 2 cores): set CODETUNE_FULL_BENCHMARK_CHECK=1")
    every = load_mbpp(variant, data_dir()).tasks
    # sanitized: all 427 problems; full: the 500 of the evaluation split.
    problems = every if variant == "sanitized" else select_problems(variant, data_dir())[0]
    fast = [p for p in problems if p.task_id not in SLOW_REFERENCE]
    _, records = score_completions(fast, {p.task_id: [p.code] for p in fast}, [1], sandbox)
    failed = {r["task_id"]: r["result"] for r in records if not r["passed"]}
    expected = BROKEN_REFERENCE if variant == "full" else set()
    assert set(failed) == expected, failed
    assert all(failed[i].startswith("failed: AssertionError") for i in expected)
    slow = [p for p in problems if p.task_id in SLOW_REFERENCE]
    scores, _ = score_completions(
        slow, {p.task_id: [p.code] for p in slow}, [1], Sandbox(SandboxLimits(timeout=90))
    )
    assert scores == {"pass@1": 1.0}
    # The sanitized problems are a reworded subset of the full file's: one pass of wrong solutions is enough.
    if variant == "sanitized":
        none = {p.task_id: [_return_none(p)] for p in problems}
        wrong, records = score_completions(problems, none, [1], sandbox)
        assert wrong == {"pass@1": 0.0}, [r["task_id"] for r in records if r["passed"]]


# -- with a model -----------------------------------------------------------------------------------------


def test_tiny_model_runs_mbpp_greedy_and_sampled(tiny_model_dir, sandbox):
    from codetune.checkpoints import load_trained

    model, tokenizer = load_trained(str(tiny_model_dir))
    problems, task_meta = select_problems("sanitized", data_dir(), limit=2)
    assert len(tokenizer(build_prompt(problems[0]))["input_ids"]) < model.config.max_position_embeddings - 8
    scores, records, meta = run_mbpp(
        model, tokenizer, problems, max_new_tokens=6, sandbox=sandbox, task_meta=task_meta
    )
    assert (
        set(scores) == {"pass@1"}
        and len(records) == 2
        and all("[DONE]" not in r["completion"] for r in records)
    )
    assert meta["settings"]["temperature"] == 0.0 and meta["task_set"]["sha256"].startswith(
        "ca95deaa9a01ef0a"
    )
    assert meta["num_tasks"] == 2 and meta["split"] == "task ids 11-510"
    scores, records, meta = run_mbpp(
        model, tokenizer, problems, n=3, k=[1, 2], max_new_tokens=4, sandbox=sandbox
    )
    assert (
        set(scores) == {"pass@1", "pass@2"} and len(records) == 6 and meta["settings"]["temperature"] == 0.8
    )
    with pytest.raises(ValueError, match="1 <= k <= n"):
        run_mbpp(model, tokenizer, problems, n=1, k=[2], sandbox=sandbox)


def test_chat_mode_uses_the_chat_template_and_takes_the_replys_code(tiny_model_dir, monkeypatch, sandbox):
    from codetune.checkpoints import load_trained
    from codetune.eval.generate import Sample

    model, tokenizer = load_trained(str(tiny_model_dir))
    problems, _ = select_problems("sanitized", data_dir(), limit=1)
    with pytest.raises(ValueError, match="no chat template"):
        run_mbpp(model, tokenizer, problems, chat=True, sandbox=sandbox)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    )
    seen = {}

    def generate(model, tok, prompts, **kwargs):
        seen.update(prompts=prompts, **kwargs)
        reply = f"Here it is:\n```python\n{problems[0].code}\n```\nDone."
        return [[Sample(text=reply, new_tokens=1, finish="stop")] for _ in prompts]

    monkeypatch.setattr(mbpp, "generate", generate)
    scores, records, meta = run_mbpp(model, tokenizer, problems, chat=True, sandbox=sandbox)
    assert seen["prompts"] == [f"<|user|>{chat_user_message(problems[0])}\n<|assistant|>"]
    assert seen["add_special_tokens"] is False and not seen.get("stop")
    assert scores == {"pass@1": 1.0} and records[0]["completion"].strip() == problems[0].code.strip()
    assert meta["settings"]["prompt"] == "chat zero-shot"


def test_unknown_variant_and_bad_limit_are_refused():
    with pytest.raises(ValueError, match="use sanitized or full"):
        select_problems("plus")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        select_problems("sanitized", limit=0)
    assert mbpp.STOP_SEQUENCES == ("[DONE]",)
