"""The notebook API gives the same results as the ``codetune`` commands it wraps, and checks its input early."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import codetune
from codetune import api
from codetune.cli import main
from tests.conftest import TINY_LLAMA
from tests.test_checkpoints import fit_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
PREVIEW_TINY = [
    "--data.init_args.seq_len=128",
    "--data.init_args.batch_size=4",
    '--data.init_args.sources=[{path: "@stdlib", name: stdlib, include: ["json/*.py"], max_files: 10}]',
    "--data.init_args.tokenizer.train.max_files=60",
    "--data.init_args.tokenizer.train.vocab_size=1024",
]
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    return result\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """A tiny trained run: (module in eval mode, its checkpoint, a FitResult pointing at it)."""
    root = tmp_path_factory.mktemp("run")
    module, path = fit_checkpoint(root, tokenizer, {"config": dict(TINY_LLAMA)})
    result = api.FitResult(
        module=module,
        datamodule=type("DataModule", (), {"tokenizer": tokenizer})(),
        trainer=None,
        checkpoint=str(path),
        run_dir=str(path.parent.parent),
        metrics={},
    )
    return module, path, result


def test_infill_from_memory_checkpoint_and_export_equals_the_cli_infill(run, tokenizer, tmp_path):
    module, path, result = run
    out = codetune.export(result, tmp_path / "exported", dtype="float32")
    (tmp_path / "prefix.py").write_text(PREFIX)
    (tmp_path / "suffix.py").write_text(SUFFIX)
    from codetune.commands.infill import infill as cli_infill

    # the oracle: what `codetune infill --model CKPT --prefix FILE --suffix FILE` returns
    expected = cli_infill(
        str(path), str(tmp_path / "prefix.py"), str(tmp_path / "suffix.py"), max_new_tokens=12
    )
    assert expected  # a random-weight model that stopped at once would make the comparison vacuous
    forms = {
        "FitResult": result,
        "module": module,
        "pair": (module.model, tokenizer),
        "hf model + tokenizer=": module.model,
        "checkpoint path": path,
        "exported folder": out,
    }
    for name, model in forms.items():
        kwargs = {"tokenizer": tokenizer} if name == "hf model + tokenizer=" else {}
        assert codetune.infill(model, PREFIX, SUFFIX, max_new_tokens=12, **kwargs) == expected, name


def test_codetune_infill_prints_the_middle_and_export_takes_a_bare_overwrite(run, tmp_path, capsys):
    from codetune.cli import main
    from codetune.commands.infill import infill as cli_infill

    _, path, _ = run
    (tmp_path / "p.py").write_text(PREFIX)
    (tmp_path / "s.py").write_text(SUFFIX)
    files = ["--prefix", str(tmp_path / "p.py"), "--suffix", str(tmp_path / "s.py"), "--max_new_tokens", "12"]
    expected = cli_infill(str(path), str(tmp_path / "p.py"), str(tmp_path / "s.py"), max_new_tokens=12)
    capsys.readouterr()
    main(["infill", "--model", str(path), *files])
    assert capsys.readouterr().out == expected + "\n"

    out = tmp_path / "exported"
    main(["export", "--ckpt_path", str(path), "--out", str(out)])
    (out / "marker").write_text("from the first export")
    with pytest.raises(SystemExit, match="--overwrite"):  # the error names the flag ...
        main(["export", "--ckpt_path", str(path), "--out", str(out)])
    # ... and the bare flag works
    main(["export", "--ckpt_path", str(path), "--out", str(out), "--overwrite"])
    assert (out / "config.json").is_file() and not (out / "marker").exists()  # replaced whole


def test_infill_in_spm_format_equals_the_cli_infill(run, tmp_path):
    _, path, result = run
    (tmp_path / "p.py").write_text(PREFIX)
    (tmp_path / "s.py").write_text(SUFFIX)
    from codetune.commands.infill import infill as cli_infill

    spm = cli_infill(
        str(path), str(tmp_path / "p.py"), str(tmp_path / "s.py"), format="spm", max_new_tokens=12
    )
    assert codetune.infill(result, PREFIX, SUFFIX, format="spm", max_new_tokens=12) == spm


def test_infill_bad_input_is_named(run, tokenizer):
    module, _, _ = run
    with pytest.raises(ValueError, match="no tokenizer"):
        codetune.infill(module.model, PREFIX, SUFFIX)
    with pytest.raises(TypeError, match="code text itself"):
        codetune.infill(module, Path("prefix.py"), SUFFIX)
    with pytest.raises(ValueError, match="unknown FIM format"):
        codetune.infill(module, PREFIX, SUFFIX, format="pms")


def test_export_can_be_called_again_after_its_submodule_is_imported(run, tmp_path):
    _, path, _ = run
    import codetune.commands.export as export_module  # the implementation module; `codetune.export` stays the function

    first = codetune.export(path, tmp_path / "a", dtype="float32")
    second = codetune.export(str(path), str(tmp_path / "b"), dtype="float32")
    assert export_module.export is not None  # the module keeps its own function
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_export_options_are_the_cli_options(run, tmp_path):
    _, path, result = run
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['dtpye'\]"):
        codetune.export(result, tmp_path / "x", dtpye="float32")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        codetune.export(result, tmp_path / "full")
    no_checkpoint = api.FitResult(None, None, None, checkpoint=None, run_dir=None, metrics={})
    with pytest.raises(ValueError, match="wrote no checkpoint"):
        codetune.export(no_checkpoint, tmp_path / "y")


def test_evaluate_humaneval_scores_like_codetune_eval(tmp_path):
    from codetune.eval.humaneval import load_problems

    problems = dict(list(load_problems().items())[:2])
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.jsonl"
    with right.open("w") as r, wrong.open("w") as w:
        for task_id, problem in problems.items():
            r.write(json.dumps({"task_id": task_id, "completion": problem["canonical_solution"]}) + "\n")
            w.write(json.dumps({"task_id": task_id, "completion": "    return None\n"}) + "\n")
    passed = codetune.evaluate("humaneval", completions=str(right), limit=2, out_dir=str(tmp_path / "a"))
    failed = codetune.evaluate("humaneval", completions=str(wrong), limit=2, out_dir=str(tmp_path / "b"))
    assert passed["scores"]["pass@1"] == 1.0 and failed["scores"]["pass@1"] == 0.0
    main(["eval", "humaneval", "--completions", str(right), "--limit", "2", "--out_dir", str(tmp_path / "c")])
    via_cli = json.loads((tmp_path / "c" / "humaneval_results.json").read_text())
    assert via_cli["scores"] == passed["scores"]


def test_evaluate_perplexity_of_a_fit_result_reads_its_checkpoint(run, tmp_path):
    _, path, result = run
    scores = codetune.evaluate(
        "perplexity",
        result,
        lengths=[16, 32],
        max_tokens=800,
        include=["json/*.py"],
        held_out_fraction=0.5,
        out_dir=str(tmp_path),
    )
    assert scores["model"] == str(path)
    assert set(scores["perplexity"]) == {"16", "32"}
    assert (
        json.loads((tmp_path / "perplexity_results.json").read_text())["perplexity"] == scores["perplexity"]
    )


def test_evaluate_rejects_unknown_tasks_and_options_before_loading_anything():
    with pytest.raises(ValueError, match="unknown task 'mbbp'"):
        codetune.evaluate("mbbp", "no/such/model")
    with pytest.raises(TypeError, match=r"\['lenghts'\]"):
        codetune.evaluate("perplexity", "no/such/model", lenghts=[16])
    with pytest.raises(TypeError, match="in-memory model"):
        codetune.evaluate("perplexity", object())
    assert set(api.eval_tasks()) == {"humaneval", "infilling", "mbpp", "retrieval", "perplexity"}


def test_preview_returns_what_codetune_preview_writes(tmp_path):
    ours = tmp_path / "api.jsonl"
    result = codetune.preview(QUICKSTART, overrides=PREVIEW_TINY, rows=3, out=ours)
    theirs = tmp_path / "cli.jsonl"
    main(
        [
            "preview",
            "--config",
            str(QUICKSTART),
            "--rows",
            "3",
            "--out",
            str(theirs),
            "--overrides",
            json.dumps(PREVIEW_TINY),
        ]
    )
    assert ours.read_text() == theirs.read_text()
    assert [json.loads(line) for line in ours.read_text().splitlines()] == result["rows"]
    with pytest.raises(FileNotFoundError, match="no/such.yaml does not exist"):
        codetune.preview("no/such.yaml")


def test_eval_of_a_run_lands_in_the_run_and_in_its_exported_model_card(run, tmp_path):
    import shutil

    _, path, _ = run
    run_dir = tmp_path / "run"
    shutil.copytree(path.parent.parent, run_dir)
    args = dict(lengths=[16], max_tokens=400, include=["json/*.py", "email/*.py"], held_out_fraction=0.5)
    scores = codetune.evaluate("perplexity", str(run_dir), **args)  # no out_dir
    written = run_dir / "eval" / "perplexity" / "perplexity_results.json"
    assert json.loads(written.read_text())["perplexity"] == scores["perplexity"]
    card = (codetune.export(str(run_dir), tmp_path / "exported") / "README.md").read_text()
    value = f"{scores['perplexity']['16']:.4g}"
    row = f"| perplexity | perplexity@16 | {value} | held-out files of stdlib |  | teacher-forced (no decoding) |"
    assert row + " scored last.ckpt |" in card
    # Training resumed after the eval (the checkpoint was rewritten): the card says the scores are of older weights.
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    os.utime(ckpt, (ckpt.stat().st_atime, ckpt.stat().st_mtime + 60))
    card = (codetune.export(str(run_dir), tmp_path / "again") / "README.md").read_text()
    assert row + " scored last.ckpt (rewritten since" in card
