"""Attention kernel choice: auto picks flash-attn only where it can run, explicit requests fail loudly."""

from __future__ import annotations

import importlib.util
import logging
from importlib.machinery import ModuleSpec

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from codetune.model.attention import resolve_attn_implementation

REAL_FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine with or without flash_attn installed and a CUDA GPU of some capability."""

    def configure(*, flash_installed: bool, cuda: bool = True, capability: tuple[int, int] = (8, 0)) -> None:
        def find_spec(name, *args, **kwargs):
            if name == "flash_attn":
                return ModuleSpec("flash_attn", None) if flash_installed else None
            return REAL_FIND_SPEC(name, *args, **kwargs)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)

    return configure


def test_auto_picks_flash_attention_on_ampere_gpu_with_flash_attn(machine, caplog):
    machine(flash_installed=True, capability=(9, 0))
    with caplog.at_level(logging.INFO, logger="codetune.model.attention"):
        assert resolve_attn_implementation("auto", "cuda") == "flash_attention_2"
    assert "flash_attention_2" in caplog.text


@pytest.mark.parametrize(
    ("flash_installed", "cuda", "capability", "device_type", "why"),
    [
        (True, True, (8, 0), "cpu", "needs a CUDA GPU"),
        (True, True, (8, 0), "mps", "needs a CUDA GPU"),
        (False, True, (8, 0), "cuda", "not installed"),
        (True, False, (8, 0), "cuda", "torch sees no CUDA GPU"),
        (True, True, (7, 5), "cuda", "Ampere or newer"),
    ],
)
def test_auto_falls_back_to_sdpa_and_logs_why(
    machine, caplog, flash_installed, cuda, capability, device_type, why
):
    machine(flash_installed=flash_installed, cuda=cuda, capability=capability)
    with caplog.at_level(logging.INFO, logger="codetune.model.attention"):
        assert resolve_attn_implementation("auto", device_type) == "sdpa"
    assert "sdpa" in caplog.text and why in caplog.text


def test_auto_without_flash_attn_installed_here_is_sdpa_even_on_cuda(monkeypatch):
    assert REAL_FIND_SPEC("flash_attn") is None, "this test assumes flash-attn is absent, as on CI"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    assert resolve_attn_implementation("auto", "cuda") == "sdpa"


@pytest.mark.parametrize(
    ("flash_installed", "cuda", "capability", "device_type", "message"),
    [
        (
            True,
            True,
            (8, 0),
            "cpu",
            r"needs a CUDA GPU and the device is 'cpu'.*use attn_implementation: sdpa",
        ),
        (False, True, (8, 0), "cuda", r"not installed \(pip install 'codetune\[gpu\]'\).*sdpa"),
        (True, False, (8, 0), "cuda", "torch sees no CUDA GPU"),
        (True, True, (7, 0), "cuda", "compute capability >= 8.0.*7.0"),
    ],
)
def test_flash_attention_where_it_cannot_run_is_refused(
    machine, flash_installed, cuda, capability, device_type, message
):
    machine(flash_installed=flash_installed, cuda=cuda, capability=capability)
    with pytest.raises(ValueError, match=message):
        resolve_attn_implementation("flash_attention_2", device_type)


@pytest.mark.parametrize("requested", ["sdpa", "eager"])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_explicit_sdpa_or_eager_is_kept_even_where_flash_could_run(machine, requested, device_type):
    machine(flash_installed=True, capability=(9, 0))
    assert resolve_attn_implementation(requested, device_type) == requested


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="'flash' is unknown: use one of"):
        resolve_attn_implementation("flash", "cpu")


def test_auto_choice_on_cpu_is_what_transformers_loads():
    config = LlamaConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32, vocab_size=32
    )
    chosen = resolve_attn_implementation("auto", "cpu")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=chosen)
    assert model.config._attn_implementation == chosen == "sdpa"
