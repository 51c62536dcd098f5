"""Key retrieval: prompts of the asked length with the key where asked, and scoring against stub models."""

from __future__ import annotations

import json
import re

import pytest
import torch

from codetune.commands.evaluate import evaluate_retrieval
from codetune.eval.retrieval import (
    DEFAULT_POSITIONS,
    QUESTION,
    build_tasks,
    load_corpus,
    parse_answer,
    score_retrieval,
)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("@stdlib")


@pytest.fixture(scope="module")
def tasks(tokenizer, corpus):
    return build_tasks(tokenizer, corpus, lengths=(512, 2048), positions=DEFAULT_POSITIONS, samples=2, seed=0)


def read_value_from_prompt(tokenizer, task) -> int:
    """What an ideal model would answer: the value returned by ``my_function`` in the decoded prompt."""
    text = tokenizer.decode(task.input_ids, skip_special_tokens=True)
    [value] = re.findall(r"def my_function\(\) -> int:\n.*\n    return (\d+)\n", text)
    return int(value)


def test_prompt_length_hits_the_target_within_tolerance(tasks):
    for task in tasks:
        assert task.length - max(8, 0.01 * task.length) <= len(task.input_ids) <= task.length


def test_key_function_sits_at_the_requested_relative_position(tokenizer, tasks):
    for task in tasks:
        assert tokenizer.decode(task.input_ids[task.key_token :]).startswith("def my_function() -> int:")
        before = task.key_token - (task.input_ids[0] == tokenizer.bos_token_id)
        assert before / task.context_tokens == pytest.approx(task.position, abs=0.03)


def test_the_answer_is_the_inserted_two_digit_value(tokenizer, tasks):
    values = set()
    for task in tasks:
        assert 10 <= task.value <= 99 and read_value_from_prompt(tokenizer, task) == task.value
        assert tokenizer.decode(task.input_ids).endswith(QUESTION)
        values.add(task.value)
    assert len(values) > 5  # values are drawn per prompt, not fixed


def test_tasks_are_fixed_by_the_seed(tokenizer, corpus):
    a = build_tasks(tokenizer, corpus, lengths=(512,), positions=(0.5,), samples=2, seed=1)
    assert a == build_tasks(tokenizer, corpus, lengths=(512,), positions=(0.5,), samples=2, seed=1)
    assert a != build_tasks(tokenizer, corpus, lengths=(512,), positions=(0.5,), samples=2, seed=2)


def test_a_stub_that_reads_the_context_scores_one_and_a_wrong_one_zero(tokenizer, tasks):
    right, _ = score_retrieval(tasks, lambda ts: [f"{read_value_from_prompt(tokenizer, t)}\n" for t in ts])
    assert right["mean"] == 1.0
    assert right["accuracy"] == {str(n): {f"{p:g}": 1.0 for p in DEFAULT_POSITIONS} for n in (512, 2048)}
    wrong, records = score_retrieval(
        tasks, lambda ts: [f"{read_value_from_prompt(tokenizer, t) + 1}" for t in ts]
    )
    assert wrong["mean"] == 0.0 and not any(r["correct"] for r in records)
    silent, _ = score_retrieval(tasks, lambda ts: ["my_function()" for _ in ts])
    assert silent["mean"] == 0.0


def test_parse_answer_reads_the_leading_integer():
    assert parse_answer(" 42\n") == 42 and parse_answer("42 and more") == 42
    assert parse_answer("x") is None and parse_answer("") is None


def test_bad_lengths_and_positions_are_rejected(tokenizer, corpus, tmp_path):
    with pytest.raises(ValueError, match="too short"):
        build_tasks(tokenizer, corpus, lengths=(20,))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        evaluate_retrieval(model=str(tmp_path / "never-loaded"), positions=(0.5, 1.5))


def test_retrieval_lengths_stay_within_the_models_context(tiny_model_dir, monkeypatch):
    """Prompts longer than the context score positions the model never saw (issue 14 #7): the defaults keep the
    lengths that fit, given ones beyond it are refused; both from the config, before the weights load."""
    import codetune.commands.evaluate as evaluate_module
    from codetune.commands.evaluate import retrieval_lengths

    assert retrieval_lengths(None, 2048) == (1024, 2048)
    assert retrieval_lengths(None, None) == (1024, 2048, 4096)
    assert retrieval_lengths((256, 512), 1024) == (256, 512)
    with pytest.raises(ValueError, match="shorter than every default"):
        retrieval_lengths(None, 512)

    def boom(*args, **kwargs):
        raise AssertionError("the weights were loaded before the lengths were checked")

    monkeypatch.setattr(evaluate_module, "load_trained", boom)
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match=rf"\[{2 * context}\] exceed the model's context of {context}"):
        evaluate_retrieval(model=str(tiny_model_dir), lengths=(256, 2 * context))


def test_tiny_model_retrieval_runs_end_to_end(tmp_path, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY_LLAMA

    cfg = dict(TINY_LLAMA)
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tokenizer), **cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    results = evaluate_retrieval(
        model=str(tmp_path / "model"), lengths=(256,), positions=(0.0, 1.0), samples=1, out_dir=str(out)
    )
    assert set(results["scores"]["accuracy"]["256"]) == {"0", "1"}
    assert json.loads((out / "retrieval_results.json").read_text())["num_tasks"] == 2
    assert len((out / "retrieval_samples.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece", "starcoder2"])
def test_prompts_end_at_a_token_boundary_of_the_answered_text(request, corpus, kind):
    # Defect: prompts ended in "== ", a lone space token with byte-level BPE, where code has "Ġ42".
    if kind == "byte-level":
        tokenizer = request.getfixturevalue("tokenizer")
    elif kind == "sentencepiece":
        tokenizer = request.getfixturevalue("codellama_tokenizer")
    else:
        from tests.vocabularies import family_tokenizer

        tokenizer = family_tokenizer("starcoder2")
    for task in build_tasks(tokenizer, corpus, lengths=(256,), positions=(0.5,), samples=2, seed=0):
        prompt = tokenizer.decode(task.input_ids, skip_special_tokens=True)
        context = prompt[: prompt.rindex("assert my_function()")]
        # The line as code writes it, tokenized in one call.
        answered = tokenizer(context + f"assert my_function() == {task.value}\n")["input_ids"]
        assert answered[: len(task.input_ids)] == task.input_ids
        assert parse_answer(f" {task.value}\n") == task.value
