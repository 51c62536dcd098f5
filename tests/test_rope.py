"""RoPE rescaling: the rescaled model's frequencies equal transformers' own references, and survive export."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from codetune.model.rope import RopeScaling, apply_rope_scaling, rebuild_rotary_embeddings

ORIGINAL = 64  # the tiny bases' training context
BASE_THETA = 20_000.0  # not transformers' default, so a fallback to the default would show
TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=1,
    intermediate_size=64,
    vocab_size=64,
    max_position_embeddings=ORIGINAL,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)
FAMILIES = ["llama", "mistral", "qwen2", "starcoder2", "phi"]  # phi: partial rotary (half the head dims)

# method -> (recipe setting, the rope_parameters a hand-built reference config gets, its max_position_embeddings)
METHODS: dict[str, tuple[dict, dict, int]] = {
    "theta": (
        dict(type="theta", theta=1_000_000, max_position_embeddings=4 * ORIGINAL),
        dict(rope_type="default", rope_theta=1e6),
        4 * ORIGINAL,
    ),
    "linear": (
        dict(type="linear", factor=4.0),
        dict(rope_type="linear", factor=4.0, rope_theta=BASE_THETA),
        4 * ORIGINAL,
    ),
    "dynamic": (
        dict(type="dynamic", factor=4.0),
        dict(rope_type="dynamic", factor=4.0, rope_theta=BASE_THETA),
        ORIGINAL,
    ),
    "yarn": (
        dict(type="yarn", factor=4.0),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL, rope_theta=BASE_THETA),
        4 * ORIGINAL,
    ),
    "yarn-tuned": (
        dict(type="yarn", factor=8.0, beta_fast=16, beta_slow=2, attention_factor=1.25, theta=50_000),
        dict(
            rope_type="yarn",
            factor=8.0,
            original_max_position_embeddings=ORIGINAL,
            rope_theta=50_000.0,
            beta_fast=16.0,
            beta_slow=2.0,
            attention_factor=1.25,
        ),
        8 * ORIGINAL,
    ),
    "llama3": (
        # wavelengths of a 16-dim head span 6..2e4 positions, so all three llama3 bands are hit at 64 / 16
        dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
        dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=ORIGINAL,
            rope_theta=BASE_THETA,
        ),
        8 * ORIGINAL,
    ),
}


def base_config(model_type: str):
    """A tiny base, built the way a checkpoint's config.json would be read."""
    return AutoConfig.for_model(
        model_type, **TINY, rope_parameters=dict(rope_type="default", rope_theta=BASE_THETA)
    )


def reference_config(model_type: str, rope_parameters: dict, max_positions: int):
    """The same model configured by hand, independently of codetune, with the target RoPE."""
    config = base_config(model_type)
    partial = config.rope_parameters.get("partial_rotary_factor")
    parameters = dict(rope_parameters, **({"partial_rotary_factor": partial} if partial is not None else {}))
    return AutoConfig.for_model(
        model_type, **{**TINY, "max_position_embeddings": max_positions}, rope_parameters=parameters
    )


def reference_frequencies(model, model_type: str, method: str, seq_len: int | None = None):
    _, parameters, max_positions = METHODS[method]
    config = reference_config(model_type, parameters, max_positions)
    if parameters["rope_type"] == "default":
        return type(model.model.rotary_emb).compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[parameters["rope_type"]](config, seq_len=seq_len)


def rescaled_model(model_type: str, method: str):
    config = base_config(model_type)
    apply_rope_scaling(config, RopeScaling(**METHODS[method][0]))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_type", FAMILIES)
def test_rescaled_frequencies_equal_transformers_reference(model_type, method):
    model = rescaled_model(model_type, method)
    rotary = model.model.rotary_emb
    expected_freq, expected_scaling = reference_frequencies(model, model_type, method)
    torch.testing.assert_close(rotary.inv_freq, expected_freq, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(expected_scaling)
    assert model.config.max_position_embeddings == METHODS[method][2]
    unscaled = AutoModelForCausalLM.from_config(base_config(model_type)).model.rotary_emb
    if method != "dynamic":  # dynamic NTK only departs from the base beyond the original length
        assert not torch.allclose(rotary.inv_freq, unscaled.inv_freq)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_dynamic_ntk_frequencies_at_long_length_equal_reference(model_type):
    model = rescaled_model(model_type, "dynamic").eval()
    length = 4 * ORIGINAL
    with torch.no_grad():
        model(torch.zeros(1, length, dtype=torch.long), use_cache=False)
    expected, _ = reference_frequencies(model, model_type, "dynamic", seq_len=length)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected, rtol=1e-6, atol=0)
    base_freq = AutoModelForCausalLM.from_config(base_config(model_type)).model.rotary_emb.inv_freq
    assert not torch.allclose(expected, base_freq)


@pytest.mark.parametrize("method", list(METHODS))
def test_saved_config_carries_only_the_new_rope_and_reloads_same_frequencies(tmp_path, method):
    model = rescaled_model("llama", method)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    _, parameters, max_positions = METHODS[method]
    assert saved["rope_parameters"] == parameters
    assert saved["max_position_embeddings"] == max_positions
    assert "rope_theta" not in saved and "rope_scaling" not in saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(
        reloaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=0, atol=0
    )


def test_legacy_scaled_base_is_replaced_without_stale_keys(tmp_path, caplog):
    # DeepSeek-Coder style config.json: top-level rope_theta and a legacy linear x4 rope_scaling.
    legacy = dict(
        model_type="llama", **{**TINY, "max_position_embeddings": 4 * ORIGINAL}, rope_theta=100_000.0
    ) | {"rope_scaling": {"type": "linear", "factor": 4.0}}
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(legacy))
    config = AutoConfig.from_pretrained(tmp_path / "base")
    config.rope_theta = 10_000.0  # a stale attribute as older code would leave it
    with caplog.at_level(logging.WARNING, logger="codetune.model.rope"):
        apply_rope_scaling(
            config, RopeScaling(type="linear", factor=8.0, original_max_position_embeddings=64)
        )
    assert "not composed" in caplog.text
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["rope_parameters"] == dict(rope_type="linear", factor=8.0, rope_theta=100_000.0)
    assert saved["max_position_embeddings"] == 512
    assert not {"rope_theta", "rope_scaling"} & saved.keys()


def test_layer_type_keyed_rope_rescales_full_attention_layers_only():
    tiny = {**TINY, "num_hidden_layers": 2, "head_dim": 16, "sliding_window": 16}
    layer_types = ["sliding_attention", "full_attention"]
    config = AutoConfig.for_model("gemma3_text", **tiny, layer_types=layer_types)
    sliding_before = dict(config.rope_parameters["sliding_attention"])
    full_theta = config.rope_parameters["full_attention"]["rope_theta"]
    apply_rope_scaling(config, RopeScaling(type="yarn", factor=4.0))
    rotary = AutoModelForCausalLM.from_config(config).model.rotary_emb

    target = dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL, rope_theta=full_theta
    )
    reference = AutoConfig.for_model(
        "gemma3_text",
        **{**tiny, "max_position_embeddings": 4 * ORIGINAL},
        layer_types=layer_types,
        rope_parameters={"sliding_attention": sliding_before, "full_attention": target},
    )
    expected, scaling = ROPE_INIT_FUNCTIONS["yarn"](reference, layer_type="full_attention")
    torch.testing.assert_close(rotary.full_attention_inv_freq, expected, rtol=1e-6, atol=0)
    assert rotary.full_attention_attention_scaling == pytest.approx(scaling)
    untouched, _ = type(rotary).compute_default_rope_parameters(reference, layer_type="sliding_attention")
    torch.testing.assert_close(rotary.sliding_attention_inv_freq, untouched, rtol=0, atol=0)
    assert config.rope_parameters["sliding_attention"] == sliding_before


def test_rebuilt_rotary_of_loaded_model_matches_model_built_rescaled():
    torch.manual_seed(0)
    loaded = AutoModelForCausalLM.from_config(base_config("llama")).eval()
    scaling = RopeScaling(type="yarn", factor=4.0)
    apply_rope_scaling(loaded.config, scaling)
    assert rebuild_rotary_embeddings(loaded) == 1

    config = base_config("llama")
    apply_rope_scaling(config, scaling)
    fresh = AutoModelForCausalLM.from_config(config).eval()
    fresh.load_state_dict(loaded.state_dict())
    ids = torch.randint(0, TINY["vocab_size"], (1, 3 * ORIGINAL))
    with torch.no_grad():
        expected = fresh(ids, use_cache=False).logits
        actual = loaded(ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("factor", [1.0, 0.5, -2.0])
@pytest.mark.parametrize("method", ["linear", "dynamic", "yarn"])
def test_factor_not_above_one_is_refused(method, factor):
    with pytest.raises(ValueError, match=r"rope\.factor=.* must be > 1"):
        RopeScaling(type=method, factor=factor)


@pytest.mark.parametrize(
    ("setting", "missing"),
    [
        (dict(type="theta"), "rope.theta"),
        (dict(type="linear"), "rope.factor"),
        (dict(type="dynamic", theta=1e6), "rope.factor"),
        (dict(type="yarn", beta_fast=16), "rope.factor"),
        (dict(type="llama3", factor=8.0), "rope.low_freq_factor, rope.high_freq_factor"),
        (dict(type="llama3", factor=8.0, low_freq_factor=1.0), "rope.high_freq_factor"),
    ],
)
def test_missing_required_field_is_named(setting, missing):
    with pytest.raises(ValueError, match=f"needs {missing}$"):
        RopeScaling(**setting)


@pytest.mark.parametrize(
    ("setting", "unused"),
    [
        (dict(type="theta", theta=1e6, factor=2.0), "rope.factor"),
        (dict(type="linear", factor=2.0, beta_fast=16), "rope.beta_fast"),
        (
            dict(type="llama3", factor=8.0, low_freq_factor=1, high_freq_factor=4, attention_factor=1.1),
            "attention",
        ),
        (
            dict(type="dynamic", factor=2.0, max_position_embeddings=256),
            "original_max_position_embeddings instead",
        ),
    ],
)
def test_field_the_method_ignores_is_refused(setting, unused):
    with pytest.raises(ValueError, match=unused):
        RopeScaling(**setting)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(type="ntk", factor=2.0), "rope.type='ntk' is unknown"),
        (dict(type="theta", theta=-1.0), r"rope\.theta=-1.0 must be > 0"),
        (dict(type="linear", factor=2.0, max_position_embeddings=100.5), "must be a positive integer"),
        (dict(type="yarn", factor=2.0, original_max_position_embeddings=0), "must be a positive integer"),
        (dict(type="yarn", factor=2.0, beta_fast=1, beta_slow=2), "beta_fast .* must exceed"),
        (
            dict(type="llama3", factor=8.0, low_freq_factor=4, high_freq_factor=1),
            "high_freq_factor .* must exceed",
        ),
    ],
)
def test_meaningless_setting_is_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        RopeScaling(**setting)


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("gpt2", {}),  # absolute position embeddings
        ("gpt_bigcode", {}),  # StarCoder 1 / SantaCoder: absolute positions, multi-query attention
        ("gptj", {}),  # fixed rotary that transformers cannot rescale
        ("falcon", {"alibi": True}),
        ("mpt", {}),
    ],
)
def test_model_without_rescalable_rope_is_refused(model_type, extra):
    config = AutoConfig.for_model(model_type, **extra)
    with pytest.raises(ValueError, match=f"model type '{model_type}' has no rescalable RoPE"):
        apply_rope_scaling(config, RopeScaling(type="linear", factor=2.0))


def test_family_that_refuses_the_method_gets_clear_error_and_untouched_config():
    config = base_config("phi3")  # Phi-3 accepts default and longrope RoPE only
    before = config.to_dict()
    with pytest.raises(ValueError, match="model type 'phi3' does not accept rope.type='yarn'"):
        apply_rope_scaling(config, RopeScaling(type="yarn", factor=4.0))
    assert config.to_dict() == before


def test_refused_setting_leaves_config_untouched():
    config = base_config("llama")
    before = config.to_dict()
    scaling = RopeScaling(type="linear", factor=2.0)
    scaling.factor = 0.5  # edited after parsing, as a notebook user might
    with pytest.raises(ValueError, match="must be > 1"):
        apply_rope_scaling(config, scaling)
    assert config.to_dict() == before


def test_bf16_true_keeps_the_rotary_frequencies_in_float32():
    """Lightning's bf16-true casts the whole module, buffers included; at θ = 1e6 and head_dim 128 a bf16
    ``inv_freq`` puts the angle at position 16,383 off by ~19 rad. The model codetune builds keeps them float32."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    from codetune.model.build import ModelSpec, load_model

    config = dict(
        TINY, model_type="llama", hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=16_384, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )  # fmt: skip
    model = HalfPrecision("bf16-true").convert_module(load_model(ModelSpec(config=config)))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # the cast did happen
    positions = torch.tensor([[0, 4095, 16_383]])
    x = torch.zeros(1, 3, 256, dtype=torch.bfloat16)
    cos, sin = model.model.rotary_emb(x, positions)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    angles = positions[0, :, None].double() * inv_freq
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    error = (positions[0, :, None].double() * model.model.rotary_emb.inv_freq.double() - angles).abs().max()
    assert error < 1e-2, f"angles off by up to {error:.2f} rad"
    # what the attention sees: cos/sin of the right angles, rounded to bf16 only at the end
    torch.testing.assert_close(cos[0, :, :64].double(), angles.cos(), atol=8e-3, rtol=0)
    torch.testing.assert_close(sin[0, :, :64].double(), angles.sin(), atol=8e-3, rtol=0)

    # A rank that built the model on the meta device gets its tables from rank 0 (FSDP2), then the bf16 cast
    from codetune.model.rope import remember_rotary_tables

    meta = load_model(ModelSpec(config=config), meta=True).to_empty(device="cpu")
    meta.model.rotary_emb.inv_freq.copy_(model.model.rotary_emb.inv_freq)  # what the broadcast does
    remember_rotary_tables(meta)
    meta = HalfPrecision("bf16-true").convert_module(meta)
    meta.model.rotary_emb(x, positions)
    assert meta.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(
        meta.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=0, atol=0
    )
