"""Mixing by token shares: realised shares track the weights, stop rules, and weights that do not sum to 1."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from codetune.data.mixing import MixConfig, RowMixer, check_weights

SEQ = 256


def fake_rows(name: str, index: int, count: int, seed: int):
    """Rows of one source: ``count`` rows with a random number of pad tokens at the end (as packers emit)."""
    rng = random.Random(f"{name}-{seed}")
    for i in range(count):
        real = SEQ if rng.random() < 0.7 else rng.randint(SEQ // 2, SEQ)
        yield {
            "token_kind": [1] * real + [0] * (SEQ - real),
            "source_index": [index] * real + [-1] * (SEQ - real),
            "documents": [{"source": name, "doc_id": f"{name}-{seed}-{i}"}],
        }


def opener(sizes: dict[str, int]):
    names = list(sizes)
    return lambda name, k: fake_rows(name, names.index(name), sizes[name], k)


def realised_shares(rows, names) -> dict[str, float]:
    """Token shares counted from the rows themselves (not from the mixer's own bookkeeping)."""
    counts = Counter(i for row in rows for i in row["source_index"] if i >= 0)
    total = sum(counts.values())
    return {n: counts[i] / total for i, n in enumerate(names)}


def test_code_llama_rehearsal_shares_hold_within_a_point_over_a_million_tokens():
    weights = {"instruct": 0.92, "code": 0.06, "nl": 0.02}
    # Small sources repeat; the mix stops at the token budget.
    mixer = RowMixer(weights, num_tokens=1_000_000)
    rows = list(mixer.mix(opener({"instruct": 900, "code": 40, "nl": 7})))
    shares = realised_shares(rows, list(weights))
    assert sum(sum(1 for i in r["source_index"] if i >= 0) for r in rows) >= 1_000_000
    for name, weight in weights.items():
        assert abs(shares[name] - weight) <= 0.01, (name, shares)
        # The schedule is tighter than the requirement: within one row of the target.
        assert abs(shares[name] - weight) <= SEQ / 1_000_000 + 1e-9
    assert mixer.stats.passes["nl"] > 1 and mixer.stats.passes["instruct"] > 1


def test_shares_hold_at_every_prefix_not_only_at_the_end():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    rows = list(RowMixer(weights, num_tokens=200_000).mix(opener({"a": 10**6, "b": 10**6, "c": 10**6})))
    counts, total = Counter(), 0
    for row in rows:
        for i in row["source_index"]:
            if i >= 0:
                counts[i] += 1
                total += 1
        for j, name in enumerate(weights):
            assert abs(counts[j] - weights[name] * total) <= SEQ


def test_first_exhausted_stops_when_any_source_runs_out_and_repeats_nothing():
    rows = list(RowMixer({"big": 0.5, "small": 0.5}).mix(opener({"big": 1000, "small": 10})))
    ids = [r["documents"][0]["doc_id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert sum(1 for i in ids if i.startswith("small")) == 10
    assert sum(1 for i in ids if i.startswith("big")) <= 12  # about as many tokens as `small` had


def test_all_exhausted_repeats_small_sources_until_every_source_ran_out():
    mixer = RowMixer({"big": 0.5, "small": 0.5}, stop="all_exhausted")
    rows = list(mixer.mix(opener({"big": 100, "small": 10})))
    ids = [r["documents"][0]["doc_id"] for r in rows]
    assert {f"big-0-{i}" for i in range(100)} <= set(ids)  # every row of the big source once
    assert mixer.stats.passes["small"] >= 9  # the small one went round again and again


def test_each_once_yields_every_row_exactly_once():
    rows = list(RowMixer({"a": 0.7, "b": 0.3}, stop="each_once").mix(opener({"a": 50, "b": 80})))
    ids = [r["documents"][0]["doc_id"] for r in rows]
    assert sorted(ids) == sorted([f"a-0-{i}" for i in range(50)] + [f"b-0-{i}" for i in range(80)])


def test_mixing_is_deterministic():
    weights = {"a": 0.6, "b": 0.4}
    first = [r["documents"] for r in RowMixer(weights, num_tokens=50_000).mix(opener({"a": 30, "b": 30}))]
    second = [r["documents"] for r in RowMixer(weights, num_tokens=50_000).mix(opener({"a": 30, "b": 30}))]
    assert first == second


def test_weights_that_do_not_sum_to_one_are_an_error_that_shows_the_normalised_shares():
    with pytest.raises(ValueError, match=r"sum to 1\.2, not 1.*instruct: 0\.7667"):
        check_weights({"instruct": 0.92, "code": 0.06, "nl": 0.22}, ["instruct", "code", "nl"])
    # floating-point sums of shares that are meant to be 1 pass
    assert check_weights({"a": 0.92, "b": 0.06, "c": 0.02}, ["a", "b", "c"])["a"] == 0.92


def test_weights_must_name_every_source():
    with pytest.raises(ValueError, match=r"unknown \['cod'\]; missing \['code'\]"):
        check_weights({"instruct": 0.94, "cod": 0.06}, ["instruct", "code"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": {"a": -0.1, "b": 1.1}}, "must be a finite number >= 0"),
        ({"stop": "never"}, "mix.stop must be"),
        ({"num_tokens": 0}, "num_tokens must be >= 1"),
    ],
)
def test_bad_mix_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixConfig(**kwargs)
