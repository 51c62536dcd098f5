"""Any HF code LM in: tiny random models of each family load, get LoRA on auto-resolved targets and train a step;
a codetune checkpoint or an exported folder is a valid starting point for the next stage."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from codetune.checkpoints.trained import build_training_model
from codetune.model.adapters import FAMILY_TARGETS, Adapter, resolve_target_modules
from codetune.model.build import ModelSpec, load_model
from codetune.model.rope import RopeScaling
from codetune.modules.causal import CausalLM
from tests.conftest import quiet_trainer

DECODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
FAMILIES = {
    "llama": dict(model_type="llama", **DECODER),  # Code Llama, DeepSeek-Coder
    "mistral": dict(model_type="mistral", **DECODER),
    "qwen2": dict(model_type="qwen2", **DECODER),  # Qwen2.5-Coder
    "starcoder2": dict(model_type="starcoder2", **DECODER),
    # StarCoder 1 / SantaCoder: multi-query attention, absolute positions
    "gpt_bigcode": dict(
        model_type="gpt_bigcode", n_embd=64, n_inner=128, n_layer=2, n_head=4, multi_query=True
    ),
}


def packed_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows, each two documents packed back to back (positions restart, no loss across the seam)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 32), generator=generator)
    position_ids = torch.cat([torch.arange(20), torch.arange(12)]).expand(2, -1).clone()
    labels = ids.clone()
    labels[:, 20] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def block_linear_names(model: torch.nn.Module) -> set[str]:
    """Full names of the linear layers inside the transformer blocks (everything but the output head)."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_gets_lora_on_auto_targets_and_trains_a_step(family, tokenizer):
    spec = ModelSpec(config=FAMILIES[family], adapter=Adapter(method="lora", r=4, alpha=8, dropout=0.0))
    plain = load_model(ModelSpec(config=FAMILIES[family]), tokenizer)
    module = CausalLM(model=spec, tokenizer=tokenizer)
    module.configure_model()
    model = module.model

    adapted = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in model.named_modules()
        if n.endswith(".lora_A")
    }
    assert adapted == block_linear_names(plain)  # every attention and MLP projection, not the head
    if family == "gpt_bigcode":
        attn = plain.transformer.h[0].attn
        head_dim = 64 // 4
        assert attn.c_attn.out_features == 64 + 2 * head_dim  # one shared key/value head (multi-query)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = module.configure_optimizers()
    batch = packed_batch(len(tokenizer))
    out = module.token_losses(batch)
    loss = out.total / out.mask.sum()
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the step moved it
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.parametrize("family", sorted(FAMILY_TARGETS))
def test_family_target_table_names_real_linear_layers(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = FAMILIES.get(family, dict(model_type=family, **DECODER))
    values = {k: v for k, v in values.items() if k != "model_type"}
    config = AutoConfig.for_model(
        family, vocab_size=128, pad_token_id=None, bos_token_id=1, eos_token_id=2, **values
    )
    model = AutoModelForCausalLM.from_config(config)
    targets = resolve_target_modules(model, "auto")
    matched = {n for n in block_linear_names(model) if n.rsplit(".", 1)[-1] in targets}
    assert matched == block_linear_names(model)


def test_unknown_family_falls_back_to_every_block_linear_layer():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_neox",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=128,
    )
    model = AutoModelForCausalLM.from_config(config)
    targets = resolve_target_modules(model, "auto")
    assert {n for n in block_linear_names(model) if n.rsplit(".", 1)[-1] in targets} == block_linear_names(
        model
    )


# ---- starting points: an exported folder, a training checkpoint, a run directory -------------------------------
class Rows(L.LightningDataModule):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]

    def train_dataloader(self):
        return DataLoader(
            self.rows,
            batch_size=2,
            collate_fn=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
        )


def fit(module: CausalLM, tmp_path, steps: int = 3) -> str:
    """Train ``module`` a few steps and save a checkpoint where Lightning's loggers put it."""
    trainer = quiet_trainer(tmp_path, max_steps=steps)
    vocab = len(module.tokenizer)
    trainer.fit(module, datamodule=Rows([packed_batch(vocab, seed) for seed in range(steps)]))
    path = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    trainer.save_checkpoint(path)
    return str(path)


def test_a_lora_checkpoint_continues_as_the_merged_model_it_trained(tokenizer, tiny_llama, tmp_path):
    spec = ModelSpec(config=tiny_llama, adapter=Adapter(method="lora", r=4, alpha=8, dropout=0.0))
    module = CausalLM(model=spec, tokenizer=tokenizer, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    path = fit(module, tmp_path)

    raw = torch.load(path, weights_only=True)  # plain hparams and tensors only
    keys = list(raw["state_dict"])
    assert any(".lora_A.default." in k for k in keys) and any(".base_layer." in k for k in keys)
    trained = copy.deepcopy(module.model).merge_and_unload().state_dict()

    for name_or_path in (path, str(tmp_path)):  # the .ckpt file, or the run directory it is in
        continued = build_training_model(ModelSpec(name_or_path=name_or_path), tokenizer)
        assert type(continued).__name__ == "LlamaForCausalLM"
        state = continued.state_dict()
        assert state.keys() == trained.keys()
        for key, value in trained.items():
            torch.testing.assert_close(state[key], value, msg=key)


def test_a_checkpoint_carries_its_rope_into_the_next_stage(tokenizer, tiny_llama, tmp_path):
    rope = RopeScaling(type="theta", theta=500_000.0, max_position_embeddings=4096)
    module = CausalLM(model=ModelSpec(config=tiny_llama, rope=rope), tokenizer=tokenizer)
    path = fit(module, tmp_path, steps=1)
    continued = build_training_model(ModelSpec(name_or_path=path), tokenizer)
    assert continued.config.rope_parameters["rope_theta"] == 500_000.0
    assert continued.config.max_position_embeddings == 4096
    batch = packed_batch(len(tokenizer))
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=batch["input_ids"], use_cache=False).logits
        got = continued.eval()(input_ids=batch["input_ids"], use_cache=False).logits
    torch.testing.assert_close(got, expected)


def test_a_checkpoint_with_another_tokenizer_is_refused(tokenizer, tiny_llama, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    path = fit(CausalLM(model=ModelSpec(config=tiny_llama), tokenizer=tokenizer), tmp_path, steps=1)
    vocab = {
        token: len(tokenizer) - 1 - i for token, i in tokenizer.get_vocab().items()
    }  # same tokens, ids reversed
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")))
    with pytest.raises(ValueError, match="disagrees with the tokenizer of checkpoint"):
        build_training_model(ModelSpec(name_or_path=path), other)


def test_an_exported_folder_loads_with_its_weights(tokenizer, tiny_llama, tmp_path):
    module = CausalLM(model=ModelSpec(config=tiny_llama), tokenizer=tokenizer)
    module.configure_model()
    module.model.save_pretrained(tmp_path / "export")
    loaded = load_model(ModelSpec(name_or_path=str(tmp_path / "export")), tokenizer)
    for key, value in module.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_checkpoint_is_named_before_anything_loads(tmp_path):
    spec = ModelSpec(name_or_path=str(tmp_path / "runs" / "quickstart" / "last.ckpt"))
    with pytest.raises(
        FileNotFoundError, match="last.ckpt does not exist; run the stage that writes it first"
    ):
        spec.validate()


def test_misspelt_model_config_key_is_refused(tiny_llama):
    from codetune.model.build import ModelSpec

    tiny_llama["num_hidden_layer"] = tiny_llama.pop("num_hidden_layers")  # the default would be 32 layers
    with pytest.raises(
        ValueError, match="num_hidden_layer: LlamaConfig has no such key; did you mean num_hidden_layers"
    ):
        ModelSpec(config=tiny_llama).validate()
    with pytest.raises(ValueError, match="'lama' is not a transformers architecture .did you mean.*llama"):
        ModelSpec(config={"model_type": "lama"}).validate()
    # Keys an architecture takes though its config does not define them stay allowed: RoPE θ (stored in
    # rope_parameters), head_dim (read by the Qwen2 and StarCoder2 attention), and keys of published configs.
    for config in (
        {"model_type": "llama", "rope_theta": 500000.0},
        {"model_type": "qwen2", "head_dim": 32},
        {"model_type": "starcoder2", "head_dim": 32, "norm_type": "layer_norm", "mlp_type": "default"},
        {"model_type": "gpt_bigcode", "rope_theta": 500000.0},  # no RoPE here: kept, warned about
    ):
        ModelSpec(config=config).validate()


def test_missing_local_base_is_named_before_anything_is_built(monkeypatch, tmp_path):
    import huggingface_hub

    from codetune.model.build import ModelSpec

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="runs/a/b is no file or folder here"):
        ModelSpec(name_or_path="runs/a/b").validate()  # two slashes: never a Hub id
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    ModelSpec(
        name_or_path="deepseek-ai/deepseek-coder-6.7b-base"
    ).validate()  # may be on the Hub: not judged here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="runs/quickstart is no file or folder here.*HF_HUB_OFFLINE"):
        ModelSpec(name_or_path="runs/quickstart").validate()
