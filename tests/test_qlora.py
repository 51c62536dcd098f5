"""QLoRA is real: 4-bit NF4 linear layers with packed storage, only adapters (and new token rows) train, the loss
falls on CPU; 8-bit bases load; a device bitsandbytes cannot serve is one clear error before loading."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from codetune.checkpoints.trained import build_training_model
from codetune.data.tokenizer import SENTINEL_SETS, ensure_sentinels
from codetune.model.adapters import Adapter, Quantization
from codetune.model.build import ModelSpec, load_model
from tests.conftest import quiet_trainer

bnb = pytest.importorskip("bitsandbytes")

BASE_VOCAB = 1024
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    vocab_size=BASE_VOCAB,
    tie_word_embeddings=False,
)
QLORA = Adapter(method="lora", r=8, alpha=16, dropout=0.0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("llama-base")
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def grown_tokenizer(tokenizer):
    grown = copy.deepcopy(tokenizer)
    ensure_sentinels(grown, SENTINEL_SETS["starcoder"])  # ids 1024..1027 are new to the base
    return grown


def adapted_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_qlora_linear_layers_are_nf4_linear4bit_with_packed_storage(storage, base_dir, grown_tokenizer):
    quantization = Quantization(quant_storage=storage, compute_dtype="bfloat16", double_quant=True)
    model = load_model(
        ModelSpec(name_or_path=base_dir, adapter=QLORA, quantization=quantization), grown_tokenizer
    )
    layers = adapted_layers(model)
    assert len(layers) == 2 * 7  # every projection of both blocks
    for name, layer in layers.items():
        base = layer.base_layer
        assert isinstance(base, bnb.nn.Linear4bit), name
        weight = base.weight
        assert isinstance(weight, bnb.nn.Params4bit)
        assert weight.dtype == getattr(torch, storage)
        # packed: two 4-bit codes per byte, whatever the storage dtype
        assert weight.numel() * weight.element_size() * 2 == base.in_features * base.out_features
        state = weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # nested = double-quantized block scales
        assert state.dtype == torch.float32  # the dtype it dequantizes back to
        assert base.compute_dtype == torch.bfloat16
    # embeddings and head stay in full precision
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)


def test_qlora_trains_only_adapters_and_new_token_rows_and_the_loss_falls(base_dir, grown_tokenizer):
    spec = ModelSpec(name_or_path=base_dir, adapter=QLORA, quantization=Quantization(compute_dtype="float32"))
    model = load_model(spec, grown_tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        ("lora_A" in n or "lora_B" in n or "trainable_tokens_delta" in n) for n in trainable
    )
    token_rows = {
        n.split(".token_adapter")[0].rsplit(".", 1)[-1]: sorted(m.token_indices["default"])
        for n, m in model.named_modules()
        if n.endswith("token_adapter")
    }
    new_ids = list(range(BASE_VOCAB, len(grown_tokenizer)))
    assert token_rows == {"embed_tokens": new_ids, "lm_head": new_ids}  # untied head: both matrices

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    deltas = {n: p.detach().clone() for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(grown_tokenizer), (4, 32), generator=generator)
    ids[:, 5:9] = torch.tensor(new_ids)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    assert losses[-1] < losses[0] - 0.1, losses
    for name, param in model.named_parameters():
        if name in frozen:  # packed 4-bit weights, norms, embedding and head base rows: bit for bit the same
            assert torch.equal(param, frozen[name]), name
    for name, before in deltas.items():  # the new rows moved (in the embedding and in the head)
        assert not torch.equal(dict(model.named_parameters())[name], before), name


def test_qlora_on_a_model_built_from_config_quantizes_it_too(tiny_llama):
    spec = ModelSpec(config=tiny_llama, adapter=QLORA, quantization=Quantization())
    model = load_model(spec)
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in adapted_layers(model).values())


def test_8bit_base_loads_as_int8_layers_and_trains_a_lora_step(base_dir):
    spec = ModelSpec(name_or_path=base_dir, adapter=QLORA, quantization=Quantization(bits=8))
    model = load_model(spec)
    layers = adapted_layers(model)
    assert layers and all(isinstance(m.base_layer, bnb.nn.Linear8bitLt) for m in layers.values())
    assert all(m.base_layer.weight.dtype == torch.int8 for m in layers.values())
    ids = torch.randint(0, BASE_VOCAB, (2, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_device_bitsandbytes_cannot_quantize_on_is_one_error_before_loading(base_dir, monkeypatch):
    import bitsandbytes.functional
    import transformers

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel for this device\nsecond line of a long trace")

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the quantization check")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", unsupported)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    spec = ModelSpec(name_or_path=base_dir, adapter=QLORA, quantization=Quantization())
    with pytest.raises(ValueError) as error:
        load_model(spec)
    message = str(error.value)
    assert "bitsandbytes cannot run 4-bit nf4 layers on device 'cpu'" in message
    assert "no kernel for this device" in message and "\n" not in message


def test_missing_bitsandbytes_is_one_error(base_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    spec = ModelSpec(name_or_path=base_dir, adapter=QLORA, quantization=Quantization())
    with pytest.raises(ValueError, match="needs bitsandbytes"):
        load_model(spec)


def test_qlora_gradients_after_a_validation_pass_equal_those_of_the_dequantized_model(base_dir):
    # Reference: the same adapted model with every 4-bit weight dequantized into a plain float32 Linear.
    spec = ModelSpec(name_or_path=base_dir, adapter=QLORA, quantization=Quantization(compute_dtype="float32"))
    model = load_model(spec)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # nonzero B, so gradients depend on the path through the base
            param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    reference = copy.deepcopy(model)
    for layer in adapted_layers(reference).values():
        base = layer.base_layer
        dense = torch.nn.Linear(base.in_features, base.out_features, bias=False)
        dense.weight = torch.nn.Parameter(
            bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float(),
            requires_grad=False,
        )
        layer.base_layer = dense
    ids = torch.randint(0, BASE_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))

    model.eval()  # a validation pass first: on AVX512-BF16 CPUs bitsandbytes repacks the weights here
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model.train()
    for m in (model, reference):
        m(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    ours = dict(model.named_parameters())
    assert grads
    for name, expected in grads.items():
        torch.testing.assert_close(ours[name].grad, expected, rtol=1e-3, atol=1e-5, msg=name)


def test_a_qlora_checkpoint_loads_weights_only_and_merges_into_the_full_precision_base(
    base_dir, tokenizer, tmp_path
):
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from codetune.modules.causal import CausalLM

    spec = ModelSpec(name_or_path=base_dir, adapter=QLORA, quantization=Quantization(compute_dtype="float32"))
    module = CausalLM(model=spec, tokenizer=tokenizer, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    ids = torch.randint(0, BASE_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "labels": r} for r in ids]
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=2))
    path = tmp_path / "qlora.ckpt"
    trainer.save_checkpoint(path)

    state = torch.load(path, weights_only=True)["state_dict"]
    assert any(
        k.endswith("q_proj.base_layer.weight.absmax") for k in state
    )  # the 4-bit base as bitsandbytes saves it
    continued = build_training_model(ModelSpec(name_or_path=str(path)), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    merged = dict(continued.named_modules())
    original = dict(base.named_modules())
    for name, layer in adapted_layers(module.model).items():
        plain = name.removeprefix("base_model.model.")
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        # W + BA·s on the full-precision base, not on the 4-bit copy
        torch.testing.assert_close(merged[plain].weight, original[plain].weight + delta, msg=plain)
