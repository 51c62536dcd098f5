"""Optimizers (Lion, AdamW fused on CUDA, paged 8-bit AdamW), LR schedules and early dropout."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from codetune.callbacks import EarlyDropout, dropout_sites
from codetune.optim import AdamW, Lion, WarmupCosine, WarmupLinear, wants_fused


# ---- Lion -----------------------------------------------------------------------------------------------------
def test_lion_follows_the_papers_update_rule():
    torch.manual_seed(0)
    start = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(4)]
    lr, (beta1, beta2), wd = 0.01, (0.9, 0.99), 0.1

    param = torch.nn.Parameter(start.clone())
    optimizer = Lion([param], lr=lr, betas=(beta1, beta2), weight_decay=wd)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()

    # Chen et al. 2023, Algorithm 2, in float64, written out
    p, m = start.double(), torch.zeros(5, 3, dtype=torch.float64)
    for g in grads:
        g = g.double()
        update = torch.sign(beta1 * m + (1 - beta1) * g)
        p = p - lr * (update + wd * p)
        m = beta2 * m + (1 - beta2) * g
    torch.testing.assert_close(param.detach().double(), p, rtol=0, atol=1e-6)


def test_lion_moves_every_coordinate_by_exactly_lr_without_decay():
    param = torch.nn.Parameter(torch.zeros(1000))
    param.grad = torch.randn(1000) * torch.logspace(-6, 3, 1000)  # gradients across nine orders of magnitude
    Lion([param], lr=0.003).step()
    assert torch.allclose(param.detach().abs(), torch.full((1000,), 0.003))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(lr=0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(weight_decay=-1), "weight_decay")],
)
def test_lion_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lion([torch.nn.Parameter(torch.zeros(2))], **kwargs)


# ---- AdamW ----------------------------------------------------------------------------------------------------
def test_adamw_is_fused_only_when_every_parameter_is_on_cuda():
    def fake(device: str, floating: bool = True):
        return SimpleNamespace(device=torch.device(device), is_floating_point=lambda: floating)

    assert wants_fused([fake("cuda"), fake("cuda")])
    assert not wants_fused([fake("cuda"), fake("cpu")])
    assert not wants_fused([fake("cuda", floating=False)])
    assert wants_fused([{"params": [fake("cuda")]}, {"params": [fake("cuda")]}])
    assert not wants_fused([])
    cpu = AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert not cpu.defaults["fused"]


def test_adamw_steps_like_torchs_with_code_llama_defaults():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    b.data.copy_(a.data)
    ours = AdamW([a], lr=1e-2)
    reference = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for _ in range(3):
        g = torch.randn(8)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(a, b)


# ---- paged 8-bit AdamW ----------------------------------------------------------------------------------------
def test_paged_adamw_8bit_keeps_8bit_moments_and_descends():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    target = torch.randn(64, 128)
    param = torch.nn.Parameter(torch.zeros(64, 128))  # 8192 elements: above min_8bit_size, so 8-bit state
    from codetune.optim import PagedAdamW8bit

    optimizer = PagedAdamW8bit([param], lr=0.05, weight_decay=0.0)
    losses = []
    for _ in range(20):
        loss = ((param - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    state = optimizer.state[param]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_optimizers_are_recipe_keys(tmp_path):
    from codetune.commands.fit import CodetuneCLI
    from tests.test_cli import QUICKSTART, TINY

    for class_path, expected in [
        ("codetune.optim.Lion", "Lion"),
        ("codetune.optim.AdamW", "AdamW"),
        ("codetune.optim.PagedAdamW8bit", "PagedAdamW8bit"),
    ]:
        cli = CodetuneCLI(
            args=[
                "--config",
                str(QUICKSTART),
                *TINY,
                f"--trainer.default_root_dir={tmp_path}",
                f"--model.init_args.optimizer={{class_path: {class_path}, init_args: {{lr: 0.0001}}}}",
            ],
            run=False,
        )
        optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(4))])
        assert type(optimizer).__name__ == expected
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


# ---- schedules ------------------------------------------------------------------------------------------------
def lrs(scheduler_cls, steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = scheduler_cls(optimizer, total_steps=steps, **kwargs)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_warmup_cosine_reaches_the_code_llama_floor():
    values = lrs(WarmupCosine, 200, warmup_steps=10)
    assert values[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])
    assert max(values) == pytest.approx(1.0)
    # halfway through the decay: the midpoint between peak and floor
    assert values[10 + 95] == pytest.approx(1 / 30 + (1 - 1 / 30) * 0.5 * (1 + math.cos(math.pi * 95 / 190)))
    assert values[-1] == pytest.approx(1 / 30, abs=1e-3)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_warmup_linear_decays_to_zero():
    values = lrs(WarmupLinear, 101, warmup_steps=0)
    assert values == pytest.approx([1 - i / 101 for i in range(101)])


# ---- early dropout --------------------------------------------------------------------------------------------
@pytest.fixture
def dropout_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_bigcode",
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=64,
        resid_pdrop=0.2,
        embd_pdrop=0.2,
        attn_pdrop=0.2,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    return get_peft_model(base, LoraConfig(r=4, lora_dropout=0.3, target_modules=["c_attn"]))


def fake_trainer(step: int, total: int = 100):
    return SimpleNamespace(global_step=step, estimated_stepping_batches=total)


def test_early_dropout_decays_every_rate_linearly_to_zero_then_restores(dropout_model):
    module = SimpleNamespace(modules=dropout_model.modules, log=lambda *a, **k: None)
    rates = {(id(m), name): rate for m, name, rate in dropout_sites(dropout_model)}
    assert {0.2, 0.3} <= set(rates.values())  # residual/embedding/attention dropout and LoRA dropout
    callback = EarlyDropout(until=0.2)  # 20 of 100 steps
    callback.on_train_start(fake_trainer(0), module)
    for step, scale in [(0, 1.0), (5, 0.75), (10, 0.5), (19, 0.05), (20, 0.0), (80, 0.0)]:
        callback.on_train_batch_start(fake_trainer(step), module, None, 0)
        for m, name, _ in dropout_sites(dropout_model):
            assert getattr(m, name) == pytest.approx(rates[(id(m), name)] * scale), (step, name)
    callback.on_train_end(fake_trainer(100), module)
    assert {(id(m), n): r for m, n, r in dropout_sites(dropout_model)} == rates


def test_early_dropout_really_switches_dropout_off(dropout_model):
    module = SimpleNamespace(modules=dropout_model.modules, log=lambda *a, **k: None)
    ids = torch.randint(0, 64, (2, 16))
    dropout_model.train()
    callback = EarlyDropout(until_step=10, schedule="constant")
    callback.on_train_start(fake_trainer(0), module)

    def two_forwards_differ() -> bool:
        with torch.no_grad():
            first = dropout_model(input_ids=ids, use_cache=False).logits
            second = dropout_model(input_ids=ids, use_cache=False).logits
        return not torch.equal(first, second)

    callback.on_train_batch_start(fake_trainer(9), module, None, 0)
    assert two_forwards_differ()  # constant schedule: full dropout until step 10
    callback.on_train_batch_start(fake_trainer(10), module, None, 0)
    assert not two_forwards_differ()  # then none at all: the training forward is deterministic


def test_early_dropout_with_p_sets_every_site_including_unconfigured_ones(tiny_llama):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in tiny_llama.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **values))  # attention_dropout 0
    module = SimpleNamespace(modules=model.modules, log=lambda *a, **k: None)
    callback = EarlyDropout(p=0.1, until_step=4)
    callback.on_train_start(fake_trainer(0), module)
    callback.on_train_batch_start(fake_trainer(2), module, None, 0)
    sites = dropout_sites(model)
    assert sites and all(rate == pytest.approx(0.05) for _, _, rate in sites)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p=1.0), "p"),
        (dict(until=0), "until"),
        (dict(until_step=0), "until_step"),
        (dict(schedule="cos"), "schedule"),
    ],
)
def test_early_dropout_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyDropout(**kwargs)


def test_matrices_decay_and_biases_norm_gains_and_dora_magnitudes_do_not(tokenizer, tiny_llama):
    from codetune.model.adapters import Adapter
    from codetune.model.build import ModelSpec
    from codetune.modules.causal import CausalLM

    config = {**tiny_llama, "attention_bias": True}  # q/k/v/o biases as well
    for adapter in (Adapter(method="full"), Adapter(method="dora", r=4)):
        module = CausalLM(
            model=ModelSpec(config=config, adapter=adapter),
            tokenizer=tokenizer,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1),
        )
        module.configure_model()
        optimizer = module.configure_optimizers()
        names = {id(p): n for n, p in module.named_parameters()}
        decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        kept = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert decayed | kept == trainable and not decayed & kept
        assert kept and all(
            n.endswith(("bias", "norm.weight", "lora_magnitude_vector.default.weight")) for n in kept
        )
        assert all(not n.endswith("bias") and "norm" not in n for n in decayed)
        if adapter.method == "full":
            assert "model.model.embed_tokens.weight" in decayed and any("q_proj.bias" in n for n in kept)
        else:
            assert any("lora_magnitude_vector" in n for n in kept) and any("lora_A" in n for n in decayed)
