"""The efficacy experiments (benchmarks/efficacy) still run end to end: each script's whole pipeline at an
absurdly small size (a 1-layer model, a few steps, a few dozen files), writing its JSON, plot and docs section."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EFFICACY = REPO / "benchmarks" / "efficacy"

TOKENIZER = {"train": {"corpus": "@stdlib", "vocab_size": 400, "max_files": 20}, "sentinels": "codellama"}
# The base trains on a corner of the stdlib the instruct mix's code source (its first 200 files) never reaches,
# so the rehearsal experiment keeps some never-trained held-out files at this size too.
CORNER = {"path": "@stdlib", "name": "stdlib", "include": ["email/**/*.py", "json/*.py"], "max_files": 30}
TINY_MODEL = [
    f"--model.init_args.model.config.{key}={value}"
    for key, value in {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }.items()
]


def _data_module(path: Path, seq_len: int, sources: list, **extra) -> str:
    init = {"tokenizer": TOKENIZER, "sources": sources, "seq_len": seq_len, "batch_size": 2, **extra}
    init.setdefault("split", {"val_fraction": 0.2, "max_val_rows": 2})
    path.write_text(json.dumps({"class_path": "codetune.data.CodeDataModule", "init_args": init}))
    return str(path)


def _script(name: str):
    sys.path.insert(0, str(EFFICACY))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EFFICACY))


def _common(tmp_path: Path) -> list[str]:
    return [
        "--runs", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
        "--results", str(tmp_path / "results"), "--docs", str(tmp_path / "efficacy.md"),
        "--override=--trainer.limit_val_batches=1",
    ]  # fmt: skip


def _check_outputs(tmp_path: Path, experiment: str) -> dict:
    result = json.loads((tmp_path / "results" / f"{experiment}_seed0.json").read_text())
    assert (tmp_path / "results" / f"{experiment}_seed0.png").stat().st_size > 0
    docs = (tmp_path / "efficacy.md").read_text()
    assert f"<!-- efficacy:{experiment}:start -->" in docs
    assert result["command"] in docs  # the docs show the command that made the numbers
    return result


@pytest.mark.slow
def test_fim_for_free_pipeline_writes_results_plot_and_docs(tmp_path):
    data = _data_module(tmp_path / "stdlib.json", 256, [CORNER], fim={"level": "context"})
    result = _script("fim_for_free").main(
        [*_common(tmp_path), "--steps", "2", "--val-every", "2", "--per-file", "1", "--max-new-tokens", "4",
         f"--override=--data={data}", *(f"--override={o}" for o in TINY_MODEL)]
    )  # fmt: skip
    assert _check_outputs(tmp_path, "fim_for_free") == json.loads(json.dumps(result))
    rates = {entry["fim_rate"] for entry in result["models"].values()}
    assert rates == {0.0, 0.9}
    for entry in result["models"].values():
        assert entry["infilling_tasks"] == entry["held_out_files"] > 0
        assert 0.0 <= entry["scores"]["exact_match_psm"] <= 1.0


@pytest.mark.slow
def test_fim_for_free_measure_only_reloads_the_trained_models(tmp_path):
    """Re-measuring a finished run from its checkpoints gives the numbers the run itself measured."""
    data = _data_module(tmp_path / "stdlib.json", 256, [CORNER], fim={"level": "context"})
    argv = [*_common(tmp_path), "--steps", "2", "--val-every", "2", "--per-file", "1", "--max-new-tokens", "2",
            f"--override=--data={data}", *(f"--override={o}" for o in TINY_MODEL)]  # fmt: skip
    script = _script("fim_for_free")
    trained = script.main(argv)
    measured = script.main([*argv, "--measure-only"])
    assert measured["command"] == trained["command"]  # the docs still show the command that trained them
    for rate, entry in trained["models"].items():
        again = measured["models"][rate]["scores"]
        assert again["left_to_right"]["loss"] == pytest.approx(
            entry["scores"]["left_to_right"]["loss"], rel=1e-5
        )
        assert again["infilling_loss_psm"] == pytest.approx(entry["scores"]["infilling_loss_psm"], rel=1e-5)


@pytest.mark.slow
def test_long_context_pipeline_writes_results_plot_and_docs(tmp_path):
    base = _data_module(tmp_path / "base.json", 256, [CORNER], fim=None)
    long = _data_module(tmp_path / "long.json", 1024, [CORNER], fim=None)
    result = _script("long_context").main(
        [*_common(tmp_path), "--steps", "2", "--lcft-steps", "1", "--samples", "1", "--ppl-tokens", "2048",
         f"--base-override=--data={base}", *(f"--base-override={o}" for o in TINY_MODEL),
         f"--lcft-override=--data={long}"]
    )  # fmt: skip
    _check_outputs(tmp_path, "long_context")
    assert set(result["models"]) == {"base", "continued", "lcft_theta", "linear", "yarn"}
    for entry in result["models"].values():
        assert set(entry["perplexity"]) == {"256", "512", "1024"}
        assert set(entry["retrieval"]) == {"256", "1024"}


@pytest.mark.slow
def test_rehearsal_pipeline_writes_results_plot_and_docs(tmp_path):
    base = _data_module(tmp_path / "base.json", 256, [CORNER], fim={"level": "context"})
    mix = (REPO / "data_modules" / "instruct-mix.yaml").read_text()
    instruct = tmp_path / "instruct.yaml"
    instruct.write_text(
        mix.replace("vocab_size: 4096", "vocab_size: 400").replace("max_files: 300", "max_files: 20")
        .replace("max_files: 200", "max_files: 30").replace("seq_len: 512", "seq_len: 256")
        .replace("batch_size: 8", "batch_size: 2")
    )  # fmt: skip
    result = _script("rehearsal").main(
        [*_common(tmp_path), "--steps", "2", "--instruct-steps", "1",
         f"--base-override=--data={base}", *(f"--base-override={o}" for o in TINY_MODEL),
         f"--instruct-override=--data={instruct}",
         "--instruct-override=--trainer.limit_val_batches=8"]  # every held-out conversation: per-source losses
    )  # fmt: skip
    _check_outputs(tmp_path, "rehearsal")
    assert set(result["models"]) == {"rehearsal", "no_rehearsal"}
    assert result["settings"]["code_eval_files"] > 0
    for entry in result["models"].values():
        assert entry["instruct_loss_before"] is not None and entry["instruct_loss_after"] is not None
