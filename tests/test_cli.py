"""The `codetune` command end to end, recipe composition, and one-line errors on bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from codetune.cli import main
from codetune.commands.fit import CodetuneCLI

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

# Small enough for seconds on 2 cores; the recipe's own model shape and data pipeline are kept.
TINY = [
    "--trainer.max_steps=12",
    "--trainer.val_check_interval=6",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.seq_len=128",
    "--data.init_args.batch_size=4",
    '--data.init_args.sources=[{path: "@stdlib", name: stdlib, include: ["json/*.py", "email/*.py", "*.py"], max_files: 60}]',
    "--data.init_args.tokenizer.train.max_files=60",
    "--data.init_args.tokenizer.train.vocab_size=1024",
]


def _cli(*args: str) -> CodetuneCLI:
    return CodetuneCLI(args=list(args), run=False)


@pytest.mark.slow
def test_fit_from_the_command_line_writes_a_checkpoint_and_lowers_the_loss(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = shutil.which("codetune") or f"{sys.executable} -m codetune.cli"
    cmd = [*exe.split(), "fit", "--config", str(QUICKSTART), *TINY, f"--trainer.default_root_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(train) >= 10 and len(val) >= 2
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3
    assert val[-1] < val[0]  # val[0] is the untrained model, validated before fitting
    assert "val loss before" in proc.stderr and "val loss after" in proc.stderr
    assert "tok/s" in proc.stdout + proc.stderr

    # `validate --ckpt_path RUN_DIR` takes the run directory, as export and eval do, and scores those weights.
    cli = CodetuneCLI(
        args=["validate", "--config", str(QUICKSTART), *TINY, f"--trainer.default_root_dir={tmp_path / 'v'}",
              "--ckpt_path", str(tmp_path)]
    )  # fmt: skip
    assert float(cli.trainer.callback_metrics["val/loss"]) == pytest.approx(val[-1], abs=1e-4)


def test_recipe_data_composes_from_nested_yaml_and_from_command_line(tmp_path):
    via_recipe = _cli("--config", str(QUICKSTART), *TINY)
    via_flag = _cli(
        "--config", str(QUICKSTART), "--data", str(REPO / "data_modules" / "stdlib.yaml"), *TINY[4:]
    )
    for cli in (via_recipe, via_flag):
        assert type(cli.datamodule).__name__ == "CodeDataModule"
        assert cli.datamodule.seq_len == 128
    # the model receives the data module's own tokenizer object: ids and embeddings cannot disagree
    assert via_recipe.model.tokenizer is via_recipe.datamodule.tokenizer


def test_a_source_list_on_top_of_a_recipe_replaces_the_recipes_list(tmp_path):
    """One user source over the stdlib recipe's one source: nothing of the stdlib entry leaks into it (issue 12/14:
    jsonargparse merged equal-length lists entry by entry, inheriting ``exclude: [test/**, ...]`` and
    ``max_files: 400``); ``+=`` still appends."""
    from codetune.commands.fit import sources_replace

    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "test_app.py").write_text("def test_app():\n    assert True\n")
    mine = {"path": str(repo), "name": "mine"}
    data = tmp_path / "my-data.yaml"
    data.write_text(
        json.dumps({"class_path": "codetune.data.CodeDataModule", "init_args": {"sources": [mine]}})
    )
    tiny = [a for a in TINY if not a.startswith("--data.init_args.sources")]
    for how in (["--data", str(data)], [f"--data.init_args.sources=[{json.dumps(mine)}]"]):
        source = _cli("--config", str(QUICKSTART), *how, *tiny).datamodule.sources[0]
        assert (source.name, source.exclude, source.max_files) == ("mine", [], None), how
    # The rewrite itself: a later list clears the earlier one, a first list and an append are left alone.
    first = ["fit", "--data.init_args.sources=[{path: a}]"]
    assert sources_replace(first) == first
    appended = ["fit", "--config", str(QUICKSTART), "--data.init_args.sources+=[{path: a}]"]
    assert sources_replace(appended) == appended
    replaced = sources_replace(["fit", "--config", str(QUICKSTART), "--data", str(data)])
    assert replaced == [
        "fit",
        "--config",
        str(QUICKSTART),
        "--data.init_args.sources=[]",
        "--data",
        str(data),
    ]


def test_tensorboard_logs_beside_csv_in_the_same_run_folder(tmp_path):
    """With the package installed, TensorBoard logs by default, into the CSV logger's version folder."""
    from codetune.commands.fit import default_loggers

    assert [type(x).__name__ for x in default_loggers(str(tmp_path), tensorboard=False)] == ["CSVLogger"]
    pytest.importorskip("tensorboard")
    csv, board = default_loggers(str(tmp_path), tensorboard=True)
    assert Path(board.log_dir) == Path(csv.log_dir) / "tensorboard"


def test_dotted_overrides_reach_trainer_and_model(tmp_path):
    cli = _cli(
        "--config",
        str(QUICKSTART),
        *TINY,
        "--trainer.max_steps=3",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.init_args.optimizer.init_args.lr=0.01",
    )
    assert cli.trainer.max_steps == 3
    assert cli.trainer.default_root_dir == str(tmp_path)
    cli.model.configure_model()
    optimizer = cli.model.optimizer_factory(cli.model.parameters())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)  # the recipe's own value survives the override


def test_print_config_shows_the_resolved_recipe(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(QUICKSTART), "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: codetune.modules.CausalLM" in out
    assert "class_path: codetune.data.CodeDataModule" in out


def test_missing_config_file_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "no/such/recipe.yaml"])
    assert "no/such/recipe.yaml" in str(exit_.value) and "no such file" in str(exit_.value)


def test_malformed_yaml_names_the_file_and_line_before_anything_is_built(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("trainer:\n  max_steps: 5\n model: [\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(QUICKSTART), "--config", str(bad)])
    message = str(exit_.value)
    assert f"--config {bad}: line 3, column 2: not valid YAML" in message and "\n" not in message


def test_unknown_key_in_recipe_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("max_steps: 150", "max_stepz: 150"))
    shutil.copytree(REPO / "data_modules", tmp_path.parent / "data_modules", dirs_exist_ok=True)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(bad)])
    assert "max_stepz" in str(exit_.value)  # one line naming the key (and the likely spelling)


def test_missing_corpus_path_fails_before_training(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                str(QUICKSTART),
                *TINY,
                f'--data.init_args.sources=[{{path: "{tmp_path}/does-not-exist"}}]',
            ]
        )
    message = str(exit_.value)
    assert "does-not-exist does not exist" in message and "\n" not in message


def test_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    lines = [json.dumps({"text": f"def f{i}():\n    return {i}\n"}) for i in range(5)]
    lines[3] = '{"text": "def broken('  # a record cut off mid-line
    data = tmp_path / "code.jsonl"
    data.write_text("\n".join(lines) + "\n")
    source = f"[{{class_path: codetune.data.sources.JsonlFiles, init_args: {{path: {data}, name: code, on_error: raise}}}}]"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(QUICKSTART), *TINY, f"--data.init_args.sources={source}"])
    message = str(exit_.value)
    assert f"{data}:4: malformed JSON" in message and "on_error: skip" in message and "\n" not in message


def test_missing_relative_paths_name_the_directory_they_were_read_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for source in (
        '[{path: "my-repo"}]',
        "[{class_path: codetune.data.sources.JsonlFiles, init_args: {path: d.jsonl}}]",
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(QUICKSTART), *TINY, f"--data.init_args.sources={source}"])
        assert f"relative to the current directory {tmp_path}" in str(exit_.value)


def test_corpus_without_usable_files_fails_before_training(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_bytes(b"\x00\x01binary")
    (corpus / "b.py").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                str(QUICKSTART),
                *TINY,
                f'--data.init_args.sources=[{{path: "{corpus}"}}]',
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    message = str(exit_.value)
    assert "no usable files" in message and "binary=1" in message and "empty=1" in message
    assert not (tmp_path / "lightning_logs" / "version_0" / "checkpoints").exists()


@pytest.mark.slow
def test_instruct_summary_shows_the_loss_of_each_mix_source_before_and_after(tmp_path, capsys, monkeypatch):
    import re

    from tests.conftest import TINY_LLAMA

    monkeypatch.chdir(REPO)  # the recipe's demo data paths are relative to the repository root
    model = json.dumps({"name_or_path": None, "config": TINY_LLAMA})
    CodetuneCLI(
        args=["fit", "--config", str(REPO / "recipes" / "tiny-instruct.yaml"), f"--model.init_args.model={model}",
              "--trainer.max_steps=4", "--data.init_args.seq_len=256",
              "--data.init_args.tokenizer.train.max_files=60", "--data.init_args.tokenizer.train.vocab_size=1024",
              f"--trainer.default_root_dir={tmp_path}"]
    )  # fmt: skip
    err = capsys.readouterr().err
    rows = {
        m[0]: (float(m[1]), float(m[2]))
        for m in re.findall(r"val loss (\w+)\s*│\s*([\d.]+) -> ([\d.]+)", err)
    }
    assert set(rows) == {"instruct", "code", "nl"}, err[-2000:]
    # four steps on the instructions already lower their loss
    assert rows["instruct"][1] < rows["instruct"][0]
    assert "…" not in err  # the checkpoint and run paths are shown whole (wrapped), for copying
