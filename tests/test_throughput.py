"""Throughput: FLOPs per token against PyTorch's own FLOP counter, the GPU peak table, and MFU as logged."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from codetune import callbacks
from codetune.callbacks import Throughput, flops_per_token, gpu_chip, peak_flops
from tests.conftest import TINY_LLAMA, quiet_trainer

SEQ = 32


def _tiny(**overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**dict(TINY_LLAMA, vocab_size=256, **overrides))
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _measured_flops_per_token(model, batch: int = 2) -> float:
    """Matmul FLOPs of one forward + backward, counted by ``torch.utils.flop_counter`` (eager attention is
    plain matmuls, so the attention term is counted too)."""
    ids = torch.randint(0, 256, (batch, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return counter.get_total_flops() / ids.numel()


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_equals_the_counted_flops_of_full_fine_tuning(tied):
    model = _tiny(tie_word_embeddings=tied)
    assert flops_per_token(model, SEQ) == _measured_flops_per_token(model)


def test_flops_per_token_counts_no_weight_gradients_for_frozen_weights():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    estimate, measured = flops_per_token(model, SEQ), _measured_flops_per_token(model)
    full = flops_per_token(_tiny(), SEQ)
    assert estimate < 0.85 * full  # frozen weights skip their weight-gradient matmuls
    # What the estimate overcounts is exactly what the first layer does not need: its input does not require
    # grad, so neither do the frozen q/k/v projections' and LoRA A's input gradients, nor the gradient for K.
    d, r = TINY_LLAMA["hidden_size"], 4
    head_dim = d // TINY_LLAMA["num_attention_heads"]
    q, kv = d * d, d * TINY_LLAMA["num_key_value_heads"] * head_dim
    first_layer = 2 * (q + 2 * kv) + 2 * (2 * d * r) + 2 * TINY_LLAMA["num_attention_heads"] * head_dim * SEQ
    assert estimate - measured == first_layer


@pytest.mark.parametrize(
    "name, chip",
    [
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA H100 80GB HBM3", "h100 sxm"),
        ("NVIDIA H100 PCIe", "h100 pcie"),
        ("NVIDIA H100 NVL", "h100 nvl"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200 nvl"),
        ("NVIDIA H100", None),  # variant unknown: no guess
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpu_names_map_to_their_peak_table_entry(name, chip):
    assert gpu_chip(name) == chip


def test_no_peak_and_no_mfu_on_cpu():
    assert peak_flops(torch.device("cpu"), "bf16-mixed") is None


class _Rows(L.LightningDataModule):
    def train_dataloader(self):
        ids = torch.randint(3, 200, (16, SEQ), generator=torch.Generator().manual_seed(0))
        kind = torch.ones_like(ids)
        kind[:, -8:] = 0  # a quarter of each row is padding
        rows = [{"input_ids": i, "labels": i, "token_kind": k} for i, k in zip(ids, kind, strict=True)]
        return DataLoader(rows, batch_size=4)


def _fit(tmp_path, throughput: Throughput) -> L.Trainer:
    from codetune.model.build import ModelSpec
    from codetune.modules.causal import CausalLM

    module = CausalLM(model=ModelSpec(config=dict(TINY_LLAMA, vocab_size=256), attn_implementation="eager"))
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[throughput])
    trainer.fit(module, datamodule=_Rows())
    return trainer


def test_tokens_and_real_tokens_per_second_are_logged(tmp_path):
    throughput = Throughput()
    trainer = _fit(tmp_path, throughput)
    metrics = trainer.callback_metrics
    assert throughput.total_tokens == 3 * 4 * SEQ
    assert throughput.total_real_tokens == 3 * 4 * (SEQ - 8)
    assert float(metrics["real_tok/s"]) == pytest.approx(0.75 * float(metrics["tok/s"]), rel=1e-4)
    assert "mfu" not in metrics and throughput.mfu is None


def test_mfu_is_model_flops_over_peak(tmp_path, monkeypatch):
    peak = 1e12  # pretend the CPU is a GPU from the table
    monkeypatch.setattr(callbacks, "peak_flops", lambda device, precision: peak)
    throughput = Throughput(window=100)
    trainer = _fit(tmp_path, throughput)
    tokens_per_s = throughput.total_tokens / throughput.train_seconds  # the window holds every step
    expected = flops_per_token(trainer.lightning_module.model, SEQ) * tokens_per_s / peak
    assert throughput.mfu == pytest.approx(expected, rel=1e-6)
    assert float(trainer.callback_metrics["mfu"]) == pytest.approx(expected, rel=1e-4)


def test_progress_bar_labels_a_step_bounded_run_without_a_negative_epoch_count():
    from types import SimpleNamespace

    from codetune.callbacks import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
