"""Runs that cannot end corrupted or look finished when they are not (issue 12, run integrity; issue 14 #9, #12).

Oracles: bytes changed on disk behind the writer's back (a flipped bit, 64 floats set to NaN, a file cut in half),
which the checksums written with the checkpoint must catch while an untouched copy passes; a run poisoned with a
NaN, whose checkpoints on disk must stay the finite ones; a real ``codetune fit`` process sent SIGTERM, whose exit
status, saved ``last`` and printed resume command are then used as a user would.
"""

from __future__ import annotations

import csv
import os
import shlex
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch

from codetune.callbacks import ProgressBar
from codetune.checkpoints.format import read_checkpoint
from codetune.checkpoints.integrity import (
    CorruptCheckpoint,
    NonFiniteError,
    add_checksums,
    verify_checksums,
)
from codetune.checkpoints.locate import locate
from tests.test_fsdp import TINY, rows
from tests.test_resume import TINY_RECIPE

REPO = Path(__file__).resolve().parents[1]
# TINY_RECIPE without its own ModelCheckpoint: codetune's default checkpointing (last linked to the epoch file).
RECIPE = [a for a in TINY_RECIPE if not a.startswith("--trainer.callbacks+=")]
STEPS, STOP_AT = 6, 3


class SignalAt(L.Callback):
    """Send this process ``sig`` after optimizer step ``step``, as a scheduler preempting the job would."""

    def __init__(self, step: int, sig: int = 15) -> None:
        self.step, self.sig = step, sig  # 15: SIGTERM (a plain int, so the saved config.yaml can hold it)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


# ---- checksums -------------------------------------------------------------------------------------------------
def _member_offset(archive: bytes, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) zip member's bytes start: after its local header, whose extra field may
    differ in length from the central directory's."""
    name_len, extra_len = struct.unpack("<HH", archive[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def test_a_bit_flipped_on_disk_and_nans_written_behind_the_writer_are_named_and_a_clean_copy_passes(tmp_path):
    checkpoint = {
        "state_dict": {"model.w": torch.randn(64, 64), "model.b": torch.randn(64).bfloat16()},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(64, 64)}}}],
        "global_step": 3,
    }
    add_checksums(checkpoint)
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    assert verify_checksums(torch.load(path, weights_only=True), path) == 3  # the untouched file passes

    archive = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        sizes = {i.filename: i for i in z.infolist() if "/data/" in i.filename}
    first = min(sizes.values(), key=lambda i: i.header_offset)  # storage of the first tensor pickled: model.w
    archive[_member_offset(archive, first) + 1000] ^= 0x08
    (tmp_path / "flipped.ckpt").write_bytes(archive)
    with pytest.raises(
        CorruptCheckpoint, match=r"flipped.ckpt: corrupted — 1 of 3 tensors .*state_dict/model.w"
    ):
        verify_checksums(torch.load(tmp_path / "flipped.ckpt", weights_only=True), tmp_path / "flipped.ckpt")

    loaded = torch.load(path, weights_only=True)
    loaded["state_dict"]["model.w"].view(-1)[:64] = float(
        "nan"
    )  # the case: 64 floats, checksums kept
    torch.save(loaded, tmp_path / "nan.ckpt")
    with pytest.raises(CorruptCheckpoint, match="state_dict/model.w"):
        verify_checksums(torch.load(tmp_path / "nan.ckpt", weights_only=True), "nan.ckpt")


def test_locate_passes_over_a_newer_run_holding_only_a_torn_save(tmp_path):
    logs = tmp_path / "lightning_logs"
    (logs / "version_0" / "checkpoints").mkdir(parents=True)
    (logs / "version_1" / "checkpoints").mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, logs / "version_0" / "checkpoints" / "last.ckpt")
    (logs / "version_1" / "checkpoints" / "last.ckpt.partial").write_bytes(b"PK\x03\x04torn")
    assert locate(tmp_path).path == logs / "version_0" / "checkpoints" / "last.ckpt"
    (logs / "version_1" / "checkpoints" / "last.ckpt").write_bytes(
        b""
    )  # an empty last is no checkpoint either
    assert locate(tmp_path).path == logs / "version_0" / "checkpoints" / "last.ckpt"


# ---- a run whose loss turns NaN ----------------------------------------------------------------------------------
class PoisonAt(L.Callback):
    """Fill one weight with NaN before the batch of step ``step`` (0-based), as an overflow would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def test_a_run_whose_loss_turns_nan_stops_by_name_and_last_keeps_the_finite_weights(tmp_path):
    from torch.utils.data import DataLoader

    from codetune.callbacks import StopOnNonFinite
    from codetune.model.build import ModelSpec
    from codetune.modules.causal import CausalLM
    from codetune.resume import AtomicCheckpoint

    module = CausalLM(model=ModelSpec(config=dict(TINY)))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[
            PoisonAt(2),
            StopOnNonFinite(),
            AtomicCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0),
        ],
    )
    with pytest.raises(NonFiniteError, match=r"step 3: the training loss is nan .*stopped without saving"):
        trainer.fit(module, train_dataloaders=DataLoader(rows(), batch_size=4))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2  # written before the poisoned step, never overwritten by it
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert verify_checksums(saved, "last.ckpt") > 0
    # and a save of NaN weights from anywhere else is refused before a byte is written
    with pytest.raises(NonFiniteError, match="not saving a checkpoint"):
        module.on_save_checkpoint({"state_dict": module.state_dict(), "global_step": 3})


# ---- SIGTERM, resume, and what a user then does with the run ----------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """A ``codetune fit`` process sent SIGTERM after step 3 of 6, then resumed by the command it printed."""
    from codetune.commands.fit import CodetuneCLI

    root = tmp_path_factory.mktemp("interrupted")
    stop = (
        f"--trainer.callbacks+={{class_path: tests.test_integrity.SignalAt, init_args: {{step: {STOP_AT}}}}}"
    )
    cmd = [
        *RECIPE,
        f"--trainer.max_steps={STEPS}",
        "--trainer.val_check_interval=2",
        "--trainer.default_root_dir=run",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    proc = subprocess.run(
        [sys.executable, "-m", "codetune.cli", "fit", *cmd, stop],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    version = root / "run" / "lightning_logs" / "version_0"
    stopped = (
        torch.load(version / "checkpoints" / "last.ckpt", weights_only=True) if proc.returncode == 143 else {}
    )
    (version / "checkpoints" / "epoch=0-step=9.ckpt.partial").write_bytes(b"left by a killed save")
    resume = proc.stderr.split("Resume with:\n", 1)[-1].strip().splitlines()[0]
    bar: list[tuple[float, float | None]] = []  # (completed, total) of the training bar after each step
    shown = ProgressBar.on_train_batch_end

    def spy(self, trainer, *args):
        shown(self, trainer, *args)
        task = self.progress.tasks[self.train_progress_bar_id]
        bar.append((task.completed, task.total))

    cwd = os.getcwd()
    os.chdir(root)
    ProgressBar.on_train_batch_end = spy
    try:
        cli = CodetuneCLI(args=shlex.split(resume)[1:])  # the printed command, as a user would paste it
    finally:
        os.chdir(cwd)
        ProgressBar.on_train_batch_end = shown
    return {
        "proc": proc,
        "root": root,
        "version": version,
        "stopped": stopped,
        "resume": resume,
        "cli": cli,
        "bar": bar,
    }


@pytest.mark.slow
def test_sigterm_exits_143_after_saving_last_and_says_how_to_resume(interrupted):
    proc = interrupted["proc"]
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert f"stopped by SIGTERM at step {STOP_AT}; saved" in proc.stderr
    assert interrupted["stopped"]["global_step"] == STOP_AT
    assert interrupted["resume"].startswith("codetune fit --config ")
    assert interrupted["resume"].endswith("--ckpt_path run/lightning_logs/version_0/checkpoints/last.ckpt")


@pytest.mark.slow
def test_the_resumed_run_continues_in_the_same_folder_bar_and_metrics(interrupted):
    version, cli = interrupted["version"], interrupted["cli"]
    assert cli.trainer.global_step == STEPS
    assert sorted(p.name for p in version.parent.iterdir()) == ["version_0"]  # no version_1
    assert not list(version.rglob("*.partial"))  # the killed save's leftover is cleaned up on the next start
    assert (version / f"config.until-step-{STOP_AT}.yaml").is_file() and (version / "config.yaml").is_file()
    train_steps = [
        int(r["step"]) for r in csv.DictReader(open(version / "metrics.csv")) if r.get("train/loss")
    ]
    assert train_steps == list(range(STEPS))  # every step once, in order: none lost, none logged twice
    # the bar goes on from the step resumed, out of the run's steps (not from 1, out of an epoch's batches)
    assert interrupted["bar"] == [(step, STEPS) for step in range(STOP_AT + 1, STEPS + 1)]
    # issue 14 #12: `last` and the checkpoint of the same step are one file on disk, not two copies
    last = version / "checkpoints" / "last.ckpt"
    twin = [p for p in last.parent.glob("epoch=*.ckpt") if os.path.samefile(p, last)]
    assert twin and last.stat().st_nlink == 2 and not last.is_symlink()


def _damaged_copy(interrupted, tmp_path, damage) -> Path:
    shutil.copytree(interrupted["root"] / "run", tmp_path / "run")  # hard links become separate files
    damage(tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    return tmp_path / "run"


def _resume_fails(run: Path, monkeypatch, *extra: str) -> str:
    from codetune.cli import main
    from codetune.data.datamodule import CodeDataModule

    def never(*args, **kwargs):
        raise AssertionError("the data module was built before the checkpoint was checked")

    monkeypatch.setattr(CodeDataModule, "__init__", never)
    with pytest.raises(SystemExit) as exit_:
        main(
            ["fit", *RECIPE, f"--trainer.max_steps={STEPS + 2}", f"--trainer.default_root_dir={run}", *extra]
        )
    message = str(exit_.value)
    assert "\n" not in message, message
    return message


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


def _nan_64_floats(path: Path) -> None:
    raw = torch.load(path, weights_only=True)
    next(iter(raw["state_dict"].values())).view(-1)[:64] = float("nan")
    path.unlink()
    torch.save(raw, path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (
            _cut_in_half,
            "last.ckpt: not a readable checkpoint (cut off, or no checkpoint: it has no end-of-archive record)",
        ),
        (lambda p: (p.unlink(), p.write_bytes(b"")), "last.ckpt: not a readable checkpoint (it is empty)"),
        (_nan_64_floats, "last.ckpt: corrupted — 1 of"),
    ],
    ids=["truncated", "empty", "64-nans"],
)
def test_a_damaged_last_is_one_line_before_the_data_offering_the_intact_checkpoint(
    interrupted, tmp_path, monkeypatch, damage, expected
):
    run = _damaged_copy(interrupted, tmp_path, damage)
    message = _resume_fails(run, monkeypatch, "--ckpt_path", "last")
    assert expected in message
    intact = run / "lightning_logs" / "version_0" / "checkpoints" / f"epoch=0-step={STEPS}.ckpt"
    assert (
        f"the newest intact checkpoint of this run is {intact}: resume with --ckpt_path {intact}" in message
    )
    assert read_checkpoint(intact).global_step == STEPS  # what is offered really is whole
    with pytest.raises(ValueError):  # export and eval refuse the damaged one as well
        read_checkpoint(run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_resuming_with_a_changed_learning_rate_is_refused_rather_than_silently_ignored(
    interrupted, monkeypatch
):
    message = _resume_fails(
        interrupted["root"] / "run",
        monkeypatch,
        "--model.init_args.optimizer.init_args.lr=0.001",
        "--ckpt_path",
        "last",
    )
    assert "the recipe changed what the run trained with (optimizer lr 0.003 -> 0.001)" in message
    assert "--model.init_args.model.name_or_path=" in message


# ---- bad input: one line before anything is built, and the catalogue in docs/troubleshooting.md ----------------
TROUBLESHOOTING = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
_SHAPE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
BAD_VALUES = {
    "vocab_size 0": {"data": {"init_args": {"tokenizer": {"train": {"vocab_size": 0}}}}},
    "hidden_size 0": {"model": {"init_args": {"model": {"config": {**_SHAPE, "hidden_size": 0}}}}},
    "hidden_size 200000": {
        "model": {
            "init_args": {"model": {"config": {**_SHAPE, "hidden_size": 200000, "num_attention_heads": 4}}}
        }
    },
    "max_steps -5": {"trainer": {"max_steps": -5}},
    "seq_len 1e9": {"data": {"init_args": {"seq_len": 1_000_000_000}}},
    "lr -1": {"model": {"init_args": {"optimizer": {"init_args": {"lr": -1.0}}}}},
    "warmup_steps -3": {"model": {"init_args": {"scheduler": {"init_args": {"warmup_steps": -3}}}}},
    "batch_size 100000": {"data": {"init_args": {"batch_size": 100000}}},
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_each_bad_recipe_value_is_one_line_and_the_troubleshooting_table_shows_it(case):
    from codetune.commands.recipe_errors import check_recipe_values

    with pytest.raises(ValueError) as err:
        check_recipe_values(BAD_VALUES[case], memory_bytes=128 * 2**30)
    message = str(err.value)
    assert "\n" not in message
    assert f"| `{case}` | {message} |" in TROUBLESHOOTING, message  # the catalogue quotes the real message


def test_an_output_dir_that_is_a_file_and_seq_len_above_the_positions_are_named(tmp_path):
    from codetune.commands.recipe_errors import check_recipe_values

    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(ValueError, match="runs is a file, not a folder") as err:
        check_recipe_values({"trainer": {"default_root_dir": str(tmp_path / "runs")}})
    assert str(err.value).replace(str(tmp_path) + "/", "") in TROUBLESHOOTING
    config = {"data": {"init_args": {"seq_len": 512}}}
    config["model"] = {"init_args": {"model": {"config": {**_SHAPE, "max_position_embeddings": 256}}}}
    (warning,) = check_recipe_values(config)
    assert "data.seq_len 512 is above the model's max_position_embeddings 256" in warning
    assert check_recipe_values({"data": {"init_args": {"seq_len": 256}}, "model": config["model"]}) == []


def test_code_files_read_only_regular_files_and_jsonl_skips_overlong_lines_by_count(tmp_path):
    from codetune.data.sources import CodeFiles, JsonlFiles

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "good.py").write_text("x = 1\n")
    (tmp_path / "code" / "zero.py").symlink_to("/dev/zero")  # read whole, it never ends
    os.mkfifo(tmp_path / "code" / "pipe.py")  # read, it blocks forever
    source = CodeFiles(path=str(tmp_path / "code"))
    assert [d.doc_id for d in source.documents()] == ["good.py"]
    assert source.skipped.counts == {"not_a_regular_file": 2}

    lines = ['{"text": "a"}', '{"text": "' + "y" * 5000 + '"}', '{"text": "b"}']
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    jsonl = JsonlFiles(path=str(tmp_path / "data.jsonl"), max_line_chars=1000)
    assert [d.text for d in jsonl.documents()] == ["a", "b"]  # the line after the long one is still read
    assert jsonl.skipped.counts == {"line_too_long": 1}
    for reason in ("not_a_regular_file", "line_too_long"):
        assert f"`{reason}=" in TROUBLESHOOTING
