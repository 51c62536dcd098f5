"""Batched generation for the evals: budgets, stops, left padding and seeding on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from codetune.checkpoints import load_trained
from codetune.eval.generate import generate, truncate_at_stop

PROMPTS = [
    "def add(a, b):\n    return",
    "import os\n\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
]


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY_LLAMA

    cfg = dict(TINY_LLAMA)
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tokenizer), **cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def token_ids(tokenizer, prompt, n, model):
    """The first ``n`` greedy token ids after ``prompt``, from a plain forward loop (no generate)."""
    ids = tokenizer(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]), use_cache=False).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_greedy_generation_matches_a_plain_argmax_loop(model, tokenizer):
    [[sample]] = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=6)
    expected = token_ids(tokenizer, PROMPTS[0], 6, model)
    assert sample.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert sample.new_tokens == 6 and sample.finish == "length"


def test_max_new_tokens_bounds_every_sample(model, tokenizer):
    for n in (1, 5):
        out = generate(model, tokenizer, PROMPTS, max_new_tokens=n)
        assert all(len(s) == 1 and s[0].new_tokens <= n for s in out)


def test_left_padded_batches_equal_one_prompt_at_a_time(model, tokenizer):
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    alone = [generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == alone


def test_stop_string_cuts_the_text_and_ends_generation_early(model, tokenizer):
    [[full]] = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=20)
    stop = full.text[6:9]  # a string the greedy continuation is known to produce
    assert stop and full.text.find(stop) >= 0
    [[cut]] = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=20, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish == "stop" and cut.new_tokens < full.new_tokens


def test_stop_token_ends_generation_at_that_token(model, tokenizer):
    ids = token_ids(tokenizer, PROMPTS[1], 8, model)
    stop_id = ids[3]
    first = ids.index(stop_id)
    [[sample]] = generate(model, tokenizer, PROMPTS[1:2], max_new_tokens=8, stop_token_ids=[stop_id])
    assert sample.new_tokens == first + 1 and sample.finish == "stop"
    assert sample.text == tokenizer.decode(ids[:first], skip_special_tokens=True)


def test_token_id_prompts_are_used_as_given(model, tokenizer):
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert generate(model, tokenizer, [ids], max_new_tokens=5) == generate(
        model, tokenizer, PROMPTS[:1], max_new_tokens=5
    )


def test_sampling_is_reproducible_by_seed_and_leaves_global_rng_alone(model, tokenizer):
    def run(seed):
        return generate(
            model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, num_samples=3, seed=seed
        )

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = run(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == run(1)
    assert a != run(2)
    assert all(len(samples) == 3 for samples in a)


def test_greedy_with_several_samples_is_rejected(model, tokenizer):
    with pytest.raises(ValueError, match="identical samples"):
        generate(model, tokenizer, PROMPTS, num_samples=2, temperature=0.0)


def test_truncate_at_stop_finds_the_earliest_stop_even_across_the_prompt_end():
    assert truncate_at_stop("x = 1\ndef g():", ["\ndef", "\nclass"]) == ("x = 1", True)
    assert truncate_at_stop("a\nclass B\ndef c", ["\ndef", "\nclass"]) == ("a", True)
    assert truncate_at_stop("nothing here", ["\ndef"]) == ("nothing here", False)
    # The prompt ended in "\n" and the model wrote "def": a new top-level def, so nothing is kept.
    assert truncate_at_stop("def g():", ["\ndef"], context='"""\n') == ("", True)


def test_load_trained_round_trips_an_exported_folder(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_trained(str(tmp_path))
    assert not loaded.training and tok.get_vocab() == tokenizer.get_vocab()
    assert generate(loaded, tok, PROMPTS, max_new_tokens=6) == generate(
        model, tokenizer, PROMPTS, max_new_tokens=6
    )
