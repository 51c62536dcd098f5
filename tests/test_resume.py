"""Resume after a crash: a run killed with SIGKILL — at a random step, or in the middle of writing a checkpoint —
and resumed from ``last`` ends with exactly the weights of a run never interrupted (CPU, deterministic).

Oracles: the uninterrupted run itself; a resume without the RNG states, which must differ (dropout is on, so the
test could not pass by accident); ``torch.load`` of what is on disk after the kill.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from codetune.checkpoints.format import check_checkpoint_fits, checkpoint_shapes
from codetune.resume import (
    PARTIAL_SUFFIX,
    PREVIOUS_SUFFIX,
    AtomicCheckpoint,
    collect_rng_state,
    commit,
    recover,
    set_rng_state,
)
from tests.test_fsdp import REPO, run_processes, tiny_run

# 8 steps per epoch, so the runs cross an epoch boundary; checkpoints every 2 steps, validation every 3.
STEPS = 10


class KillAt(L.Callback):
    """SIGKILL this process after optimizer step ``step`` (before that step's checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randn(2).tolist()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return tiny_run(tmp_path_factory.mktemp("uninterrupted"), steps=STEPS, dropout=0.2)


# ---- pieces ----------------------------------------------------------------------------------------------------
def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    state = collect_rng_state()
    expected = _draws()
    torch.save(state, tmp_path / "rng.pt")
    _draws()  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_commit_replaces_a_file_atomically_and_a_folder_through_previous(tmp_path):
    final = tmp_path / "last.ckpt"
    final.write_text("old")
    partial = tmp_path / ("last.ckpt" + PARTIAL_SUFFIX)
    partial.write_text("new")
    commit(partial, final)
    assert final.read_text() == "new" and not partial.exists()

    final.unlink()
    final.mkdir()
    (final / "shard").write_text("old")
    partial.mkdir()
    (partial / "shard").write_text("new")
    commit(partial, final)
    assert (final / "shard").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_kill_between_the_two_folder_renames_gets_the_previous_checkpoint_back(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    # the state right after `last.ckpt` -> `last.ckpt.previous`, before `.partial` -> `last.ckpt`
    (folder / ("last.ckpt" + PREVIOUS_SUFFIX)).mkdir()
    (folder / ("last.ckpt" + PREVIOUS_SUFFIX) / "meta.pt").write_text("step 4")
    (folder / ("last.ckpt" + PARTIAL_SUFFIX)).mkdir()
    recover(folder)
    assert (folder / "last.ckpt" / "meta.pt").read_text() == "step 4"


def test_last_is_found_in_the_newest_earlier_run_and_never_a_partial_write(tmp_path):
    from lightning.pytorch.trainer.states import TrainerFn

    logs = tmp_path / "lightning_logs"
    runs = {"version_0": ["last.ckpt"], "version_1": ["last.ckpt", "epoch=0-step=4.ckpt"], "version_2": []}
    for age, (run, names) in enumerate(runs.items()):
        (logs / run / "checkpoints").mkdir(parents=True)
        for name in names:
            (logs / run / "checkpoints" / name).write_text("x")
            os.utime(logs / run / "checkpoints" / name, (1000 + age, 1000 + age))
    # the newest write of all, but incomplete
    (logs / "version_2" / "checkpoints" / ("last.ckpt" + PARTIAL_SUFFIX)).write_text("torn")
    trainer = L.Trainer(default_root_dir=tmp_path, logger=L.pytorch.loggers.CSVLogger(tmp_path))
    found = AtomicCheckpoint(save_last=True)._find_last_checkpoints(trainer)
    assert found == {str(logs / v / "checkpoints" / "last.ckpt") for v in ("version_0", "version_1")}
    trainer.callbacks.append(AtomicCheckpoint(save_last=True))
    resolved = trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, "last", True, False)
    assert resolved == str(logs / "version_1" / "checkpoints" / "last.ckpt")  # Lightning takes the newest
    # an explicit dirpath is a promise about where checkpoints are: no search elsewhere
    assert AtomicCheckpoint(dirpath=tmp_path / "elsewhere")._find_last_checkpoints(trainer) == set()


def test_a_checkpoint_of_another_model_is_named_by_its_first_mismatched_tensor():
    here = {"model.embed.weight": (1024, 64), "model.head.weight": (1024, 64)}
    check_checkpoint_fits(here, dict(here), "ok.ckpt")
    with pytest.raises(
        ValueError, match=r"other.ckpt.*model.embed.weight is \(512, 64\) there, \(1024, 64\) here"
    ):
        check_checkpoint_fits(here, {**here, "model.embed.weight": (512, 64)}, "other.ckpt")
    with pytest.raises(ValueError, match="not in it"):
        check_checkpoint_fits(here, {"model.embed.weight": (1024, 64)}, "partial.ckpt")
    check_checkpoint_fits(here, {"model.embed.weight": (1024, 64)}, "adapter.ckpt", strict=False)


# ---- kill -9 ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_killed_at_a_random_step_resumes_to_identical_weights(tmp_path, uninterrupted):
    step = random.randint(3, STEPS - 1)  # a checkpoint exists from step 2 on
    proc, _ = run_processes(tmp_path, devices=1, steps=STEPS, dropout=0.2, kill_at_step=step, root=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:]
    killed_last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(killed_last, weights_only=True)["global_step"] == (step - 1) // 2 * 2

    resumed = tiny_run(tmp_path, steps=STEPS, dropout=0.2, ckpt_path="last")
    assert resumed["global_step"] == STEPS
    assert len(resumed["losses"]) == STEPS - (step - 1) // 2 * 2  # it trained only what was lost
    assert_same_weights(resumed["state"], uninterrupted["state"])

    # the RNG states are what makes this exact: without them dropout draws other masks
    without = tiny_run(
        tmp_path / "control", steps=STEPS, dropout=0.2, ckpt_path=str(killed_last), rng_state=False
    )
    assert any(not torch.equal(without["state"][k], v) for k, v in uninterrupted["state"].items())


@pytest.mark.slow
def test_run_killed_while_writing_a_checkpoint_keeps_the_previous_one_and_resumes_exactly(
    tmp_path, uninterrupted
):
    proc, _ = run_processes(tmp_path, devices=1, steps=STEPS, dropout=0.2, kill_in_save=2, root=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:]
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    # the write that was cut off is torn, the last checkpoint before it intact
    with pytest.raises(RuntimeError):
        torch.load(folder / ("last.ckpt" + PARTIAL_SUFFIX), weights_only=True)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2

    resumed = tiny_run(tmp_path, steps=STEPS, dropout=0.2, ckpt_path="last")
    assert_same_weights(resumed["state"], uninterrupted["state"])


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_run_killed_while_writing_its_sharded_checkpoint_resumes_from_the_previous_one(tmp_path):
    reference = tiny_run(tmp_path / "reference", steps=6)
    proc, _ = run_processes(tmp_path, devices=2, steps=6, kill_in_save=2, root=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:]
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert {".metadata", "meta.pt"} <= {p.name for p in (folder / "last.ckpt").iterdir()}
    assert "meta.pt" not in {p.name for p in (folder / ("last.ckpt" + PARTIAL_SUFFIX)).iterdir()}
    assert torch.load(folder / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 2

    proc, resumed = run_processes(tmp_path, devices=2, steps=6, ckpt_path="last", root=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert len(resumed["losses"]) == 4
    # two processes agree with one up to float reordering (test_fsdp), so the resumed run must too
    assert resumed["losses"] == pytest.approx(reference["losses"][2:], rel=1e-5)
    for key, value in reference["state"].items():
        torch.testing.assert_close(resumed["state"][key], value, rtol=0, atol=1e-4, msg=key)


# ---- the command line ------------------------------------------------------------------------------------------
TINY_RECIPE = [
    "--config",
    str(REPO / "recipes" / "quickstart.yaml"),
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.seq_len=64",
    "--data.init_args.batch_size=4",
    '--data.init_args.sources=[{path: "@stdlib", name: stdlib, include: ["json/*.py", "*.py"], max_files: 30}]',
    "--data.init_args.tokenizer.train.max_files=60",
    "--data.init_args.tokenizer.train.vocab_size=1024",
    "--model.init_args.model.config={model_type: llama, hidden_size: 64, intermediate_size: 128, "
    "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, "
    "attention_dropout: 0.2}",
    "--trainer.callbacks+={class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
    "init_args: {every_n_train_steps: 2, save_last: true, save_top_k: 0}}",
]


def _final_weights(root: Path, version: int) -> dict[str, torch.Tensor]:
    path = root / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_codetune_fit_ckpt_path_last_resumes_a_killed_run_exactly(tmp_path):
    from codetune.cli import main

    steps = 8
    main(
        [
            "fit",
            *TINY_RECIPE,
            f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={tmp_path / 'ref'}",
        ]
    )
    kill = random.randint(3, steps - 1)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "codetune.cli",
        "fit",
        *TINY_RECIPE,
        f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={run}",
        f"--trainer.callbacks+={{class_path: tests.test_resume.KillAt, init_args: {{step: {kill}}}}}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    main(
        [
            "fit",
            *TINY_RECIPE,
            f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={run}",
            "--ckpt_path",
            "last",
        ]
    )
    # the resumed run continues the killed one in its folder (issue 14 #9), not in a new version_1
    assert sorted(p.name for p in (run / "lightning_logs").iterdir()) == ["version_0"]
    resumed = torch.load(run / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == steps
    assert_same_weights(_final_weights(run, 0), _final_weights(tmp_path / "ref", 0))


def test_ckpt_path_that_does_not_exist_is_a_one_line_error(tmp_path):
    from codetune.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY_RECIPE, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path", "no/such.ckpt"])
    message = str(exit_.value)
    assert "no/such.ckpt: no such checkpoint" in message and "\n" not in message


def test_ckpt_path_that_is_no_checkpoint_is_a_one_line_error(tmp_path):
    from codetune.cli import main

    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                *TINY_RECIPE,
                f"--trainer.default_root_dir={tmp_path}",
                "--ckpt_path",
                str(tmp_path / "notes.ckpt"),
            ]
        )
    message = str(exit_.value)
    assert "notes.ckpt: not a readable checkpoint" in message and "\n" not in message


def test_ckpt_path_of_another_recipe_names_the_mismatched_tensor(tmp_path):
    from codetune.cli import main

    tiny_run(tmp_path / "other", steps=2)  # a vocabulary of 128, not the recipe's 1024
    other = next((tmp_path / "other").rglob("last.ckpt"))
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                *TINY_RECIPE,
                "--trainer.max_steps=4",
                "--trainer.limit_val_batches=0",
                f"--trainer.default_root_dir={tmp_path}",
                "--ckpt_path",
                str(other),
            ]
        )
    message = str(exit_.value)
    assert "does not fit the model this recipe builds" in message and "embed_tokens.weight" in message
    assert "\n" not in message


def test_checkpoint_shapes_reads_files_and_sharded_folders_alike(tmp_path):
    torch.save({"state_dict": {"model.w": torch.zeros(3, 2)}}, tmp_path / "a.ckpt")
    assert checkpoint_shapes(tmp_path / "a.ckpt") == {"model.w": (3, 2)}
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": {"model.w": torch.zeros(5, 4)}}, checkpoint_id=tmp_path / "b.ckpt", no_dist=True)
    assert checkpoint_shapes(tmp_path / "b.ckpt") == {"model.w": (5, 4)}
