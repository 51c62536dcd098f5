"""LoRA / DoRA / full fine-tuning: which weights train, and the rows of tokens new to the base."""

from __future__ import annotations

import copy

import pytest
import torch

from codetune.data.tokenizer import SENTINEL_SETS, ensure_sentinels
from codetune.model.adapters import Adapter, Quantization
from codetune.model.build import ModelSpec, load_model

BASE_VOCAB = 1024  # the session tokenizer's size: the tiny base "was trained" with exactly that vocabulary
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    vocab_size=BASE_VOCAB,
)


@pytest.fixture(scope="module")
def grown_tokenizer(tokenizer):
    """The session tokenizer plus four StarCoder sentinels the base has never seen (ids 1024..1027)."""
    grown = copy.deepcopy(tokenizer)
    added = ensure_sentinels(grown, SENTINEL_SETS["starcoder"])
    assert len(added) == 4 and len(grown) == BASE_VOCAB + 4
    return grown


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Tiny Llama checkpoints on disk (untied and tied output head), as a Hub base would be."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dirs = {}
    for tie in (False, True):
        config = AutoConfig.for_model("llama", tie_word_embeddings=tie, **TINY)
        torch.manual_seed(1)
        folder = tmp_path_factory.mktemp(f"llama-tied-{tie}")
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        dirs[tie] = str(folder)
    return dirs


def batch_with(new_ids: list[int], vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=generator)
    ids[:, 3:7] = torch.tensor(new_ids)  # the new tokens appear as inputs and as targets
    return ids


def train(model, ids: torch.Tensor, steps: int = 5, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def merged_state(model) -> dict[str, torch.Tensor]:
    """The weights the adapted model computes with, as a plain model's state dict (merge on a copy)."""
    return {k: v.detach().clone() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied-head", "tied-head"])
def test_new_token_rows_train_under_lora_and_nothing_else_outside_the_adapter(
    method, tied, base_dir, grown_tokenizer
):
    spec = ModelSpec(name_or_path=base_dir[tied], adapter=Adapter(method=method, r=4, alpha=8, dropout=0.0))
    model = load_model(spec, grown_tokenizer)
    new_ids = list(range(BASE_VOCAB, BASE_VOCAB + 4))
    before = merged_state(model)
    # module paths (as in a plain model's state dict) that carry an adapter
    adapted = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in model.named_modules()
        if n.endswith("lora_A")
    }

    losses = train(model, batch_with(new_ids, len(grown_tokenizer)))
    after = merged_state(model)

    assert losses[-1] < losses[0]
    head = "lm_head.weight"
    for key, old in before.items():
        new = after[key]
        changed_rows = (new != old).reshape(old.shape[0], -1).any(-1).nonzero().flatten().tolist()
        if key in ("model.embed_tokens.weight", head):
            assert changed_rows == new_ids, key  # exactly the new rows, in the embedding and in the head
        elif key.rsplit(".", 1)[0] in adapted:
            assert changed_rows, f"{key} is adapted but did not change"
        else:
            assert not changed_rows, f"{key} is outside the adapter but changed"
    if tied:
        assert torch.equal(after["model.embed_tokens.weight"], after[head])


def test_padding_rows_beyond_the_tokenizer_stay_frozen(base_dir, grown_tokenizer):
    model = load_model(
        ModelSpec(name_or_path=base_dir[False], adapter=Adapter(method="lora")), grown_tokenizer
    )
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(grown_tokenizer)
    trained_rows = sorted(
        i
        for name, module in model.named_modules()
        if name.endswith("token_adapter")
        for i in module.token_indices["default"]
    )
    # embedding and head each train the four new rows, and only those
    assert trained_rows == sorted(2 * list(range(BASE_VOCAB, len(grown_tokenizer))))


def test_new_rows_start_at_the_mean_embedding(base_dir, grown_tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir[False])
    model = load_model(
        ModelSpec(name_or_path=base_dir[False], adapter=Adapter(method="lora")), grown_tokenizer
    )
    merged = merged_state(model)
    mean = base.get_input_embeddings().weight.mean(0)
    new_rows = merged["model.embed_tokens.weight"][BASE_VOCAB : len(grown_tokenizer)]
    # transformers' mean resizing samples around the mean with the embeddings' covariance scaled by 1e-9
    assert torch.allclose(new_rows, mean.expand_as(new_rows), atol=1e-3)


def test_train_new_tokens_off_freezes_every_row(base_dir, grown_tokenizer):
    spec = ModelSpec(name_or_path=base_dir[False], adapter=Adapter(method="lora", train_new_tokens=False))
    model = load_model(spec, grown_tokenizer)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_full_fine_tuning_trains_every_parameter(base_dir, grown_tokenizer):
    model = load_model(ModelSpec(name_or_path=base_dir[False]), grown_tokenizer)
    assert all(p.requires_grad for p in model.parameters())
    assert type(model).__name__ == "LlamaForCausalLM"


def test_all_linear_adapts_every_block_linear_layer_but_not_the_head(base_dir, grown_tokenizer):
    plain = load_model(ModelSpec(name_or_path=base_dir[False]), grown_tokenizer)
    linear = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    spec = ModelSpec(
        name_or_path=base_dir[False], adapter=Adapter(method="lora", target_modules="all-linear")
    )
    model = load_model(spec, grown_tokenizer)
    adapted = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in model.named_modules()
        if n.endswith(".lora_A")
    }
    assert adapted == linear - {"lm_head"}
    assert len(adapted) == 2 * 7


def test_explicit_targets_adapt_only_those_modules(base_dir):
    spec = ModelSpec(
        name_or_path=base_dir[False], adapter=Adapter(method="lora", target_modules=["q_proj", "v_proj"])
    )
    model = load_model(spec)
    adapted = {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert adapted == {"q_proj", "v_proj"}


def test_unknown_lora_target_names_the_models_linear_modules(base_dir):
    spec = ModelSpec(
        name_or_path=base_dir[False], adapter=Adapter(method="lora", target_modules=["query", "v_proj"])
    )
    with pytest.raises(ValueError) as error:
        load_model(spec)
    message = str(error.value)
    assert "['query']" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message


@pytest.mark.parametrize(
    "adapter, match",
    [
        (dict(method="lora", r=0), "adapter.r"),
        (dict(method="lora", alpha=0), "adapter.alpha"),
        (dict(method="lora", dropout=1.0), "adapter.dropout"),
        (dict(method="lora", target_modules="attention"), "adapter.target_modules"),
        (dict(method="lora", target_modules=[]), "adapter.target_modules"),
        (dict(method="ia3"), "adapter.method"),
    ],
)
def test_bad_adapter_settings_are_refused_before_loading(adapter, match, tiny_llama):
    spec = ModelSpec(config=tiny_llama, adapter=Adapter(**adapter))
    with pytest.raises(ValueError, match=match):
        spec.validate()


def test_quantized_base_with_full_fine_tuning_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="adapter.method to lora or dora"):
        ModelSpec(config=tiny_llama, quantization=Quantization()).validate()


def test_spec_round_trips_through_plain_hparams(tiny_llama):
    from dataclasses import asdict

    from codetune.model.rope import RopeScaling

    spec = ModelSpec(
        config=tiny_llama,
        adapter=Adapter(method="dora", r=8, target_modules=["q_proj"]),
        quantization=Quantization(quant_storage="bfloat16"),
        rope=RopeScaling(type="theta", theta=1e6),
    )
    plain = asdict(spec)
    assert ModelSpec(**plain) == spec


def test_new_tokens_landing_in_a_bases_spare_rows_still_train(tokenizer, grown_tokenizer, tmp_path):
    """A base whose embedding already has untrained spare rows (Qwen2.5, DeepSeek-Coder): tokens past the base
    tokenizer are new even though the embedding does not grow; the base's own tokenizer says where new starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", tie_word_embeddings=False, **dict(TINY, vocab_size=BASE_VOCAB + 64)
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)  # the base's tokenizer: 1024 tokens
    model = load_model(ModelSpec(name_or_path=str(tmp_path), adapter=Adapter(method="lora")), grown_tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == BASE_VOCAB + 64  # no growth needed
    rows = {
        n: sorted(m.token_indices["default"]) for n, m in model.named_modules() if n.endswith("token_adapter")
    }
    assert list(rows.values()) == 2 * [list(range(BASE_VOCAB, BASE_VOCAB + 4))]


def test_a_tokenizer_that_renumbers_the_bases_tokens_is_refused(tokenizer, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    vocab = {token: BASE_VOCAB - 1 - i for token, i in tokenizer.get_vocab().items()}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")))
    with pytest.raises(ValueError, match=r"disagrees with the tokenizer of .* on 1024 tokens"):
        load_model(ModelSpec(name_or_path=str(tmp_path)), other)


def test_gradient_checkpointing_leaves_lora_gradients_unchanged(base_dir, grown_tokenizer):
    ids = batch_with(list(range(BASE_VOCAB, BASE_VOCAB + 4)), len(grown_tokenizer))
    grads = []
    for checkpointing in (False, True):
        spec = ModelSpec(
            name_or_path=base_dir[False],
            gradient_checkpointing=checkpointing,
            adapter=Adapter(method="lora", r=4, dropout=0.0),
        )
        torch.manual_seed(0)  # the same LoRA A initialisation both times
        model = load_model(spec, grown_tokenizer).train()
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, msg=name)
