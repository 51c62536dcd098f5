"""Perplexity by context length against an independent per-window loss, on a tiny random Llama."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from codetune.eval.perplexity import perplexity_by_length

VOCAB = 61
LENGTHS = [16, 32, 64]
STREAM_LENGTHS = [300, 130, 70, 40]  # the last is shorter than every window of the longest length


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.1,  # makes eval mode observable
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def streams():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in STREAM_LENGTHS]


def reference_perplexity(model, streams, length, longest):
    """HF's own `labels=` loss, one window at a time over each stream's first multiple of `longest` tokens."""
    losses = []
    with torch.no_grad():
        for stream in streams:
            span = len(stream) // longest * longest
            for start in range(0, span, length):
                window = torch.tensor([stream[start : start + length]])
                losses.append(model(input_ids=window, labels=window, use_cache=False).loss.item())
    # Every window scores length - 1 tokens, so the mean over windows is the mean over tokens.
    return math.exp(sum(losses) / len(losses)), len(losses)


def test_perplexity_equals_exp_of_mean_token_nll_from_hf_loss(model, streams):
    report = perplexity_by_length(model, streams, LENGTHS, batch_tokens=128)
    for length in LENGTHS:
        expected, windows = reference_perplexity(model, streams, length, longest=max(LENGTHS))
        assert report.perplexity[length] == pytest.approx(expected, rel=1e-5)
        assert report.windows[length] == windows
        assert report.tokens[length] == windows * (length - 1)
        assert report.nll[length] == pytest.approx(math.log(expected), rel=1e-5)


def test_uniform_model_has_perplexity_of_vocabulary_size(streams):
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))

    report = perplexity_by_length(Uniform(), streams, LENGTHS)
    assert report.perplexity == pytest.approx(dict.fromkeys(LENGTHS, float(VOCAB)), rel=1e-6)


class Recorder(torch.nn.Module):
    """Passes calls to a model and records what each forward received."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, input_ids, **kwargs):
        self.calls.append(
            dict(
                ids=input_ids.clone(),
                kwargs=kwargs,
                grad=torch.is_grad_enabled(),
                training=self.model.training,
            )
        )
        return self.model(input_ids=input_ids, **kwargs)


@pytest.mark.parametrize("same_tokens", [True, False])
def test_windows_hold_exactly_the_requested_tokens_without_overlap(model, streams, same_tokens):
    recorder = Recorder(model)
    report = perplexity_by_length(recorder, streams, LENGTHS, batch_tokens=100, same_tokens=same_tokens)
    for length in LENGTHS:
        batches = [call["ids"] for call in recorder.calls if call["ids"].shape[1] == length]
        assert all(batch.shape[0] <= max(1, 100 // length) for batch in batches)
        seen = torch.cat(batches).flatten().tolist()
        unit = max(LENGTHS) if same_tokens else length
        # The windows, in order, tile each stream's first multiple of `unit` tokens exactly once.
        assert seen == [token for stream in streams for token in stream[: len(stream) // unit * unit]]
        assert report.windows[length] * length == len(seen)
    assert {call["ids"].shape[1] for call in recorder.calls} == set(LENGTHS)
    assert all(call["kwargs"] == {"use_cache": False} and not call["grad"] for call in recorder.calls)


def test_same_tokens_scores_identical_text_at_every_length(model, streams):
    report = perplexity_by_length(model, streams, LENGTHS)
    assert {length: report.windows[length] * length for length in LENGTHS} == dict.fromkeys(
        LENGTHS, 256 + 128 + 64
    )


def test_batching_does_not_change_the_result(model, streams):
    one_window = perplexity_by_length(model, streams, LENGTHS, batch_tokens=1)
    many_windows = perplexity_by_length(model, streams, LENGTHS, batch_tokens=10_000)
    assert one_window.perplexity == pytest.approx(many_windows.perplexity, rel=1e-5)


def test_max_tokens_limits_the_scored_text(model, streams):
    recorder = Recorder(model)
    report = perplexity_by_length(recorder, streams, LENGTHS, max_tokens=200)
    assert {length: report.windows[length] * length for length in LENGTHS} == dict.fromkeys(LENGTHS, 192)
    assert (
        torch.cat([c["ids"] for c in recorder.calls if c["ids"].shape[1] == 64]).flatten().tolist()
        == streams[0][:192]
    )


def test_tensor_streams_match_list_streams(model, streams):
    rows = torch.tensor([streams[0][:256], streams[0][44:300]])
    from_tensor = perplexity_by_length(model, rows, [16, 64])
    from_lists = perplexity_by_length(model, rows.tolist(), [16, 64])
    assert from_tensor == from_lists
    assert perplexity_by_length(model, rows[0], [16]) == perplexity_by_length(model, [rows[0].tolist()], [16])


def test_model_is_evaluated_in_eval_mode_and_its_mode_restored(model, streams):
    recorder = Recorder(model)
    model.train()
    try:
        perplexity_by_length(recorder, streams, [16])
        assert model.training
    finally:
        model.eval()
    assert recorder.calls and not any(call["training"] for call in recorder.calls)


def test_data_shorter_than_longest_length_is_refused_before_any_forward(model, streams):
    recorder = Recorder(model)
    with pytest.raises(
        ValueError, match="shorter than the longest context length 512: its longest stream has 300"
    ):
        perplexity_by_length(recorder, streams, [16, 512])
    assert recorder.calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lengths=[]), "non-empty list"),
        (dict(lengths=64), "non-empty list"),
        (dict(lengths=[16, 1]), "context length 1 must be an integer >= 2"),
        (dict(lengths=[16.0]), "context length 16.0 must be"),
        (dict(lengths=[64], max_tokens=32), "max_tokens=32 is below the longest context length 64"),
        (dict(streams=[[1, 2, VOCAB] * 30]), r"stream 0 holds token ids outside .*\[0, 61\)"),
        (
            dict(streams=[list(range(40)), [0.5] * 80]),
            "stream 1 must be a flat sequence of integer token ids",
        ),
        (dict(streams=torch.zeros(2, 2, 80, dtype=torch.long)), "1-D or 2-D"),
    ],
)
def test_bad_input_is_refused_with_clear_message(model, streams, kwargs, message):
    arguments = dict(streams=streams, lengths=LENGTHS) | kwargs
    with pytest.raises(ValueError, match=message):
        perplexity_by_length(model, arguments.pop("streams"), arguments.pop("lengths"), **arguments)


def test_eval_perplexity_defaults_hold_out_the_quickstart_data_modules_validation_files():
    """The split hashes (seed, source name, file): the defaults must be the ones data_modules/stdlib.yaml trains with."""
    import inspect

    import yaml

    from codetune.commands.evaluate import evaluate_perplexity
    from codetune.data.datamodule import Split

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "data_modules" / "stdlib.yaml").read_text())
    defaults = {k: p.default for k, p in inspect.signature(evaluate_perplexity).parameters.items()}
    source = data["init_args"]["sources"][0]
    assert defaults["corpus"] == source["path"]
    assert defaults["source_name"] == source["name"]
    assert defaults["held_out_fraction"] == data["init_args"]["split"].get("val_fraction", Split.val_fraction)
    assert defaults["split_seed"] == data["init_args"]["split"].get("seed", Split.seed)
