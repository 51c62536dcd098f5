"""Finding and loading what a user points at: checkpoint files, run directories, sharded and exported folders."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from codetune.checkpoints import load_trained, locate, read_checkpoint
from codetune.modules.causal import CausalLM
from tests.conftest import TINY_LLAMA, quiet_trainer

CKPT = Path("lightning_logs/version_0/checkpoints/last.ckpt")


def fit_checkpoint(root: Path, tokenizer, model: dict, steps: int = 2, lr: float = 5e-2, seed: int = 0):
    """Train a CausalLM for ``steps`` real Lightning steps on random tokens and save its checkpoint where
    ``codetune fit`` would (``root/lightning_logs/version_0/checkpoints/last.ckpt``).

    Returns the trained module in eval mode and the checkpoint path. The high learning rate moves every
    trainable weight (LoRA's zero-initialised B included) far enough that a wrong export cannot pass for right.
    """
    torch.manual_seed(seed)  # peft draws LoRA's A from the global generator when the model is built
    module = CausalLM(model=model, tokenizer=tokenizer, optimizer=lambda p: torch.optim.AdamW(p, lr=lr))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tokenizer), (4, 24), generator=generator)
    rows = [{"input_ids": r, "labels": r, "position_ids": torch.arange(len(r))} for r in ids]
    trainer = quiet_trainer(root, max_steps=steps)
    trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=2))
    path = root / CKPT
    trainer.save_checkpoint(path)
    return module.eval(), path


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a Hugging Face / PEFT model, or of a CausalLM's model, in fp32."""
    model = model.model if isinstance(model, CausalLM) else model
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    return out.logits.float()


def sample_ids(tokenizer, n: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), (n, length), generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("run")
    module, path = fit_checkpoint(root, tokenizer, {"config": dict(TINY_LLAMA)})
    return module, path, root


def _touch(path: Path) -> Path:
    """A stand-in checkpoint: a whole (empty) zip archive, which is what locate checks a file for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    zipfile.ZipFile(path, "w").close()
    return path


def test_locate_resolves_every_run_folder_form_to_its_last_checkpoint(tmp_path):
    last = _touch(tmp_path / CKPT)
    _touch(last.parent / "epoch=0-step=3.ckpt")
    version = tmp_path / "lightning_logs" / "version_0"
    for given in (tmp_path, tmp_path / "lightning_logs", version, version / "checkpoints", last):
        found = locate(given)
        assert (found.kind, found.path, found.run_dir) == ("checkpoint", last, version), given
    other = locate(last.parent / "epoch=0-step=3.ckpt")
    assert other.path.name == "epoch=0-step=3.ckpt" and other.run_dir == version


def test_locate_takes_the_newest_run_and_refuses_ambiguous_checkpoints(tmp_path):
    for n in (0, 2, 10):
        _touch(tmp_path / f"lightning_logs/version_{n}/checkpoints/last.ckpt")
    assert locate(tmp_path).run_dir.name == "version_10"  # numeric order, not text order ("version_2" > "10")
    both = tmp_path / "other" / "checkpoints"
    _touch(both / "a.ckpt")
    _touch(both / "b.ckpt")
    with pytest.raises(FileNotFoundError, match=r"no last\.ckpt and 2 checkpoints \(a\.ckpt, b\.ckpt\)"):
        locate(both.parent)


def test_locate_tells_exported_and_adapter_folders_from_checkpoints(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert locate(tmp_path / "hf").kind == "hf_folder"
    assert locate(tmp_path / "adapter").kind == "adapter_folder"
    with pytest.raises(FileNotFoundError, match="missing.ckpt: no such checkpoint"):
        locate(tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a checkpoint, run directory or model folder"):
        locate(tmp_path / "empty")


def test_checkpoint_restores_the_spec_and_the_tokenizer_with_its_sentinels(trained, tokenizer):
    module, path, _ = trained
    checkpoint = read_checkpoint(path)
    assert checkpoint.spec == module.spec
    assert checkpoint.tokenizer.get_vocab() == tokenizer.get_vocab()
    text = "<PRE>def f():<SUF>\n<MID>"
    assert checkpoint.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert checkpoint.global_step == 2
    assert set(checkpoint.state_dict) == {k.removeprefix("model.") for k in module.state_dict()}


def test_load_trained_gives_the_training_module_logits_from_a_run_directory(trained, tokenizer):
    module, _, root = trained
    model, loaded_tokenizer = load_trained(root)
    ids = sample_ids(tokenizer)
    assert not model.training and model.config.use_cache
    assert torch.allclose(logits_of(model, ids), logits_of(module, ids), atol=1e-5)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_sharded_checkpoint_folder_loads_like_the_single_file(trained, tmp_path, tokenizer):
    from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save

    module, path, _ = trained
    raw = torch.load(path, weights_only=True)
    folder = tmp_path / "last.ckpt"  # what ModelParallelStrategy (FSDP2) writes: DCP shards + meta.pt
    folder.mkdir()
    _distributed_checkpoint_save({"state_dict": raw.pop("state_dict")}, folder)
    torch.save(raw, folder / "meta.pt")
    model, _ = load_trained(folder)
    ids = sample_ids(tokenizer)
    assert torch.allclose(logits_of(model, ids), logits_of(module, ids), atol=1e-5)


def test_files_that_are_not_codetune_checkpoints_are_refused_by_name(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.ckpt: not a readable"):
        read_checkpoint(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(ValueError, match="foreign.ckpt: not a codetune checkpoint"):
        read_checkpoint(foreign)


def test_weights_that_do_not_fit_the_rebuilt_model_are_refused(trained, tmp_path):
    _, path, _ = trained
    raw = torch.load(path, weights_only=True)
    raw["hyper_parameters"]["model"]["config"]["intermediate_size"] = 96  # the spec no longer matches
    torch.save(raw, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match="shapes that differ from the rebuilt model.*mlp"):
        load_trained(tmp_path / "edited.ckpt")


def test_a_run_records_its_base_as_an_absolute_path_and_a_hub_base_with_its_revision(
    tmp_path, monkeypatch, tokenizer
):
    """A continued stage works from any directory (issue 14 #2): a base given relative to where the run started
    is recorded absolute; a Hub base is pinned to the commit it was loaded from (not re-resolved to a newer push)."""
    from types import SimpleNamespace

    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    module = CausalLM(model={"name_or_path": "runs/quickstart"}, tokenizer=tokenizer)
    recorded = module.hparams["model"]["name_or_path"]
    assert recorded == str(tmp_path / "runs" / "quickstart") and module.spec.name_or_path == recorded

    import codetune.model.build as build

    monkeypatch.setattr(build, "_check_hub_id", lambda *args: None)  # offline: no Hub to ask
    hub = CausalLM(model={"name_or_path": "someone/base-7b"}, tokenizer=tokenizer)
    assert hub.hparams["model"]["name_or_path"] == "someone/base-7b"
    hub.record_hub_revision(SimpleNamespace(config=SimpleNamespace(_commit_hash="0123abcd" * 5)))
    assert hub.hparams["model"]["extra"]["revision"] == "0123abcd" * 5 == hub.spec.extra["revision"]
    pinned = CausalLM(
        model={"name_or_path": "someone/base-7b", "extra": {"revision": "v1"}}, tokenizer=tokenizer
    )
    pinned.record_hub_revision(SimpleNamespace(config=SimpleNamespace(_commit_hash="ffff")))
    assert pinned.hparams["model"]["extra"]["revision"] == "v1"  # the recipe's pin wins
