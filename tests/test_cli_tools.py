"""The non-recipe commands (`codetune eval ...`, `codetune infill`) parse their typed signatures and run."""

from __future__ import annotations

import json

import pytest

from codetune.cli import main


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in ("fit", "eval", "infill", "humaneval", "perplexity"):
        assert name in out


def test_fit_help_shows_codetunes_own_options_before_lightnings(capsys):
    """``fit --help`` starts with codetune's few options and where each part's options are (issue 14 #11), printed
    before Lightning is imported (docs/performance.md: 0.15 s to it, the full list needs torch and Lightning)."""
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    ours = out.index("--model.help codetune.modules.CausalLM")
    assert "--data.help codetune.data.CodeDataModule" in out[: ours + 200]
    assert ours < out.index("[--trainer.accelerator ACCELERATOR]")


def test_eval_perplexity_scores_held_out_code(tiny_model_dir, tmp_path, capsys):
    main(
        [
            "eval",
            "perplexity",
            "--model",
            str(tiny_model_dir),
            "--lengths",
            "[32, 64]",
            "--max_tokens",
            "3000",
            "--held_out_fraction",
            "0.5",
            "--include",
            '["json/*.py", "email/*.py"]',
            "--out_dir",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "perplexity_results.json").read_text())
    assert set(results["perplexity"]) == {"32", "64"}
    # an untrained model is close to uniform over its vocabulary
    assert all(100 < p < 10 * 1100 for p in results["perplexity"].values())


def test_eval_perplexity_without_held_out_files_says_so(tiny_model_dir, tmp_path):
    args = [
        "eval",
        "perplexity",
        "--model",
        str(tiny_model_dir),
        "--lengths",
        "[32]",
        "--out_dir",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit, match="no file of @stdlib .* is on the held-out side"):
        main([*args, "--include", '["json/*.py"]', "--held_out_fraction", "0.0"])


def test_eval_humaneval_scores_given_completions(tmp_path, capsys):
    from codetune.eval.humaneval import load_problems

    problems = load_problems()
    path = tmp_path / "completions.jsonl"
    with open(path, "w") as f:
        for task_id in list(problems)[:3]:
            f.write(
                json.dumps({"task_id": task_id, "completion": problems[task_id]["canonical_solution"]}) + "\n"
            )
    main(
        ["eval", "humaneval", "--completions", str(path), "--limit", "3", "--out_dir", str(tmp_path / "out")]
    )
    results = json.loads((tmp_path / "out" / "humaneval_results.json").read_text())
    assert results["scores"]["pass@1"] == 1.0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results["scores"]  # also on stdout


def test_unknown_eval_task_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "mbpp"])
    assert "mbpp" in capsys.readouterr().err


def test_bare_boolean_flags_mean_true():
    from codetune.cli import bare_flags_as_true
    from codetune.commands.export import export

    args = ["--ckpt_path", "run", "--overwrite", "--out", "o", "--adapter_only"]
    assert bare_flags_as_true(export, args) == [
        "--ckpt_path",
        "run",
        "--overwrite",
        "true",
        "--out",
        "o",
        "--adapter_only",
        "true",
    ]
    # an explicit value is kept
    assert bare_flags_as_true(export, ["--overwrite", "false"]) == ["--overwrite", "false"]


def test_export_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "out")])
    assert "nope.ckpt" in str(exit_.value) and "\n" not in str(exit_.value)
