"""Stage modules: FIM metrics and sentinels, long-context RoPE and perplexity by length, per-source instruct loss.

Metrics are checked against a direct per-token computation (log-softmax by hand, token by token), through a real
Lightning validation loop so the epoch weighting is what is tested.
"""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from codetune.data.tokenizer import SENTINEL_SETS, ensure_sentinels, record_sentinels
from codetune.model.adapters import Adapter
from codetune.model.build import ModelSpec
from codetune.model.rope import RopeScaling
from codetune.modules import FIMStage, InstructStage, LongContextStage
from tests.conftest import quiet_trainer

PAD, PLAIN, FIM_CONTEXT, FIM_MIDDLE = 0, 1, 2, 3


class Batches(L.LightningDataModule):
    """Hand-made batches, served as they are (one dataloader item = one batch)."""

    def __init__(self, train=None, val=None, source_names=None) -> None:
        super().__init__()
        self.train, self.val = train or [], val or []
        if source_names is not None:
            self.source_names = source_names

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=None)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=None)


def row(kinds: list[int], vocab: int, seed: int, sources: list[int] | None = None, masked=()) -> dict:
    """One packed row: token ids for the kinds given (pad = kind 0), labels -100 on pads and ``masked``."""
    generator = torch.Generator().manual_seed(seed)
    n = len(kinds)
    ids = torch.randint(3, vocab, (n,), generator=generator)
    kind = torch.tensor(kinds)
    labels = ids.clone()
    labels[kind == PAD] = -100
    labels[list(masked)] = -100
    source = torch.tensor(sources) if sources is not None else torch.where(kind == PAD, -1, 0)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.arange(n),
        "token_kind": kind,
        "source_index": source,
    }


def stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def per_token(model, batch) -> list[tuple[float, bool, int, int, int]]:
    """(loss, argmax correct, kind, source, label) of every labelled target, computed position by position."""
    out = []
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    for b in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            label = int(batch["labels"][b, t])
            if label == -100:
                continue
            log_probs = logits[b, t - 1].double().log_softmax(-1)
            out.append(
                (
                    -float(log_probs[label]),
                    int(log_probs.argmax()) == label,
                    int(batch["token_kind"][b, t]),
                    int(batch["source_index"][b, t]),
                    label,
                )
            )
    return out


# ---- FIM ------------------------------------------------------------------------------------------------------
FIM_ROWS = [
    # plain document, then a FIM document: sentinels/prefix/suffix (2), middle + end sentinel (3), then padding
    [PLAIN] * 10 + [FIM_CONTEXT] * 8 + [FIM_MIDDLE] * 6 + [PAD] * 8,
    [FIM_CONTEXT] * 5 + [FIM_MIDDLE] * 12 + [FIM_CONTEXT] * 4 + [PLAIN] * 11,
]


def test_fim_stage_logs_fim_plain_and_middle_metrics_weighted_by_tokens(tokenizer, tiny_llama, tmp_path):
    stage = FIMStage(model=ModelSpec(config=tiny_llama), tokenizer=tokenizer)
    vocab = len(tokenizer)
    with_fim = stack([row(k, vocab, seed) for seed, k in enumerate(FIM_ROWS)])
    plain_only = stack([row([PLAIN] * 32, vocab, 7), row([PLAIN] * 20 + [PAD] * 12, vocab, 8)])
    metrics = quiet_trainer(tmp_path).validate(
        stage, datamodule=Batches(val=[with_fim, plain_only]), verbose=False
    )[0]

    tokens = per_token(stage.model, with_fim) + per_token(stage.model, plain_only)

    def mean(values):
        return sum(values) / len(values)

    expected = {
        "val/loss": None,  # per-batch mean, averaged by batch size: not token-weighted, so not checked here
        "val/loss_fim": mean([loss for loss, _, kind, _, _ in tokens if kind in (FIM_CONTEXT, FIM_MIDDLE)]),
        "val/loss_plain": mean([loss for loss, _, kind, _, _ in tokens if kind == PLAIN]),
        "val/loss_middle": mean([loss for loss, _, kind, _, _ in tokens if kind == FIM_MIDDLE]),
        "val/middle_acc": mean([float(ok) for _, ok, kind, _, _ in tokens if kind == FIM_MIDDLE]),
    }
    for name, value in expected.items():
        assert name in metrics
        if value is not None:
            assert metrics[name] == pytest.approx(value, rel=1e-4), name


def test_fim_stage_gives_the_tokenizers_sentinels_single_tokens_and_embedding_rows(tokenizer, tiny_llama):
    own = copy.deepcopy(tokenizer)  # has the Code Llama sentinels only
    ensure_sentinels(
        own, SENTINEL_SETS["starcoder"]
    )  # a second set, the run's own (as build_tokenizer records it)
    record_sentinels(own, SENTINEL_SETS["starcoder"])
    stage = FIMStage(model=ModelSpec(config=tiny_llama), tokenizer=own)
    stage.configure_model()
    rows = stage.model.get_input_embeddings().weight.shape[0]
    assert stage.sentinels == SENTINEL_SETS["starcoder"]
    for token in SENTINEL_SETS["starcoder"].tokens():
        ids = own.encode(f"x{token}y", add_special_tokens=False)
        assert own.convert_tokens_to_ids(token) in ids and own.convert_tokens_to_ids(token) < rows
    assert len(own) > len(tokenizer) and rows >= len(own)


def test_fim_stage_needs_token_kind(tokenizer, tiny_llama):
    stage = FIMStage(model=ModelSpec(config=tiny_llama), tokenizer=tokenizer)
    stage.configure_model()
    batch = stack([row([PLAIN] * 16, len(tokenizer), 0)])
    del batch["token_kind"]
    out = stage.token_losses(batch)
    with pytest.raises(ValueError, match="token_kind"):
        stage.extra_metrics(batch, out)


# ---- long context ---------------------------------------------------------------------------------------------
def test_long_context_stage_needs_a_rope_setting(tokenizer, tiny_llama):
    with pytest.raises(ValueError, match="needs model.rope"):
        LongContextStage(model=ModelSpec(config=tiny_llama), tokenizer=tokenizer)


def test_perplexity_lengths_default_to_multiples_of_the_original_context(tokenizer, tiny_llama):
    yarn = LongContextStage(
        model=ModelSpec(
            config=tiny_llama, rope=RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=64)
        ),
        tokenizer=tokenizer,
    )
    yarn.configure_model()
    assert yarn.perplexity_lengths() == [64, 128, 256]
    theta = LongContextStage(
        model=ModelSpec(config=tiny_llama, rope=RopeScaling(type="theta", theta=1e6)),
        tokenizer=tokenizer,
        perplexity_multiples=[0.5, 1],
    )
    theta.configure_model()
    assert theta.perplexity_lengths() == [
        512,
        1024,
    ]  # the base config's max_position_embeddings is the original


@pytest.mark.parametrize("method", ["full", "lora"])
def test_after_the_long_context_stage_the_saved_config_carries_only_the_new_rope(
    method, tokenizer, tiny_llama, tmp_path
):
    rope = RopeScaling(type="theta", theta=1_000_000, max_position_embeddings=4096)
    spec = ModelSpec(config=dict(tiny_llama, rope_theta=10_000.0), rope=rope, adapter=Adapter(method=method))
    stage = LongContextStage(model=spec, tokenizer=tokenizer, original_length=16, perplexity_multiples=[1, 2])
    vocab = len(tokenizer)
    train = [stack([row([PLAIN] * 64, vocab, s), row([PLAIN] * 64, vocab, s + 50)]) for s in range(2)]
    val = [stack([row([PLAIN] * 64, vocab, 100)])]
    quiet_trainer(tmp_path, max_steps=2, num_sanity_val_steps=0).fit(stage, datamodule=Batches(train, val))

    model = stage.model.merge_and_unload() if method == "lora" else stage.model
    model.save_pretrained(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert saved["max_position_embeddings"] == 4096
    assert "rope_theta" not in saved and "rope_scaling" not in saved
    inv_freq = next(m for n, m in model.named_modules() if n.endswith("rotary_emb")).inv_freq
    head_dim = tiny_llama["hidden_size"] // tiny_llama["num_attention_heads"]
    expected = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)


def test_long_context_stage_logs_perplexity_of_the_held_out_tokens_at_each_length(
    tokenizer, tiny_llama, tmp_path
):
    rope = RopeScaling(type="linear", factor=4.0, original_max_position_embeddings=16)
    stage = LongContextStage(model=ModelSpec(config=tiny_llama, rope=rope), tokenizer=tokenizer)
    vocab = len(tokenizer)
    val = [
        stack([row([PLAIN] * 40 + [PAD] * 8, vocab, 1), row([PLAIN] * 48, vocab, 2)]),
        stack([row([PLAIN] * 30 + [PAD] * 18, vocab, 3)]),
    ]
    metrics = quiet_trainer(tmp_path).validate(stage, datamodule=Batches(val=val), verbose=False)[0]

    # the held-out stream: every non-pad token of the validation batches, in order (118 tokens); each length
    # scores the same first 64 (a multiple of the longest length, 4 x 16)
    stream = torch.cat([b["input_ids"][b["token_kind"] != PAD] for b in val])[:64]
    for length in (16, 32, 64):
        nll = []
        for start in range(0, 64, length):
            window = stream[start : start + length]
            with torch.no_grad():
                logits = stage.model(input_ids=window[None], use_cache=False).logits[0]
            log_probs = logits[:-1].double().log_softmax(-1)
            nll += [-float(log_probs[t, window[t + 1]]) for t in range(length - 1)]
        assert metrics[f"val/ppl@{length}"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_long_context_validation_without_enough_tokens_says_what_to_change(tokenizer, tiny_llama, tmp_path):
    rope = RopeScaling(type="theta", theta=1e6)
    stage = LongContextStage(
        model=ModelSpec(config=tiny_llama, rope=rope), tokenizer=tokenizer, original_length=64
    )
    val = [stack([row([PLAIN] * 32, len(tokenizer), 1)])]
    with pytest.raises(ValueError, match="needs at least 256 held-out tokens"):
        quiet_trainer(tmp_path).validate(stage, datamodule=Batches(val=val), verbose=False)


# ---- instruct -------------------------------------------------------------------------------------------------
def test_instruct_stage_logs_loss_per_mix_source_over_response_tokens(tokenizer, tiny_llama, tmp_path):
    stage = InstructStage(model=ModelSpec(config=tiny_llama), tokenizer=tokenizer)
    vocab = len(tokenizer)
    names = ["chat", "code", "nl"]
    # chat rows mask their prompt (positions 1-9); code/nl rehearsal rows train on every token
    batches = [
        stack(
            [
                row([PLAIN] * 24, vocab, 1, sources=[0] * 24, masked=range(1, 10)),
                row([PLAIN] * 16 + [PLAIN] * 8, vocab, 2, sources=[1] * 16 + [2] * 8),
            ]
        ),
        stack(
            [
                row([PLAIN] * 20 + [PAD] * 4, vocab, 3, sources=[0] * 20 + [-1] * 4, masked=range(1, 12)),
                row([PLAIN] * 24, vocab, 4, sources=[0] * 24, masked=range(1, 6)),
            ]
        ),
    ]
    metrics = quiet_trainer(tmp_path).validate(
        stage, datamodule=Batches(val=batches, source_names=names), verbose=False
    )[0]

    tokens = [t for b in batches for t in per_token(stage.model, b)]
    for index, name in enumerate(names):
        losses = [loss for loss, _, _, source, _ in tokens if source == index]
        assert metrics[f"val/loss/{name}"] == pytest.approx(sum(losses) / len(losses), rel=1e-4), name
    real = sum(int((b["token_kind"][:, 1:] != PAD).sum()) for b in batches)
    assert metrics["val/target_fraction"] == pytest.approx(len(tokens) / real, rel=1e-6)


def test_instruct_stage_names_sources_by_index_without_a_data_module_list(tokenizer, tiny_llama, tmp_path):
    stage = InstructStage(model=ModelSpec(config=tiny_llama), tokenizer=tokenizer)
    batch = stack([row([PLAIN] * 16, len(tokenizer), 1, sources=[0] * 8 + [1] * 8)])
    metrics = quiet_trainer(tmp_path).validate(stage, datamodule=Batches(val=[batch]), verbose=False)[0]
    assert "val/loss/source0" in metrics and "val/loss/source1" in metrics


def test_instruct_stage_needs_source_index(tokenizer, tiny_llama):
    stage = InstructStage(model=ModelSpec(config=tiny_llama), tokenizer=tokenizer)
    stage.configure_model()
    batch = stack([row([PLAIN] * 16, len(tokenizer), 0)])
    del batch["source_index"]
    out = stage.token_losses(batch)
    with pytest.raises(ValueError, match="source_index"):
        stage.extra_metrics(batch, out)


# ---- the tiny long-context recipe, end to end -----------------------------------------------------------------
@pytest.mark.slow
def test_tiny_lcft_continues_a_quickstart_run_and_lowers_perplexity_at_4x_its_length(tmp_path):
    """quickstart (64-token rows) -> tiny-lcft (256-token rows, θ raised): perplexity at 256 tokens falls."""
    import csv
    from pathlib import Path

    from codetune.commands.fit import CodetuneCLI

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    data = [
        '--data.init_args.sources=[{path: "@stdlib", name: stdlib, include: ["json/*.py", "email/*.py", "*.py"], max_files: 60}]',
        "--data.init_args.tokenizer.train.max_files=60",
        "--data.init_args.tokenizer.train.vocab_size=1024",
        "--trainer.log_every_n_steps=1",
    ]
    quickstart = tmp_path / "runs" / "quickstart"
    CodetuneCLI(
        args=[
            "fit",
            "--config",
            str(recipes / "quickstart.yaml"),
            *data,
            "--data.init_args.seq_len=64",
            "--data.init_args.batch_size=8",
            "--trainer.max_steps=40",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={quickstart}",
        ]
    )
    CodetuneCLI(
        args=[
            "fit",
            "--config",
            str(recipes / "tiny-lcft.yaml"),
            *data,
            f"--model.init_args.model.name_or_path={quickstart}",  # the run directory: its newest last.ckpt
            "--model.init_args.original_length=64",
            "--model.init_args.model.rope.max_position_embeddings=256",
            "--data.init_args.seq_len=256",
            "--data.init_args.batch_size=4",
            "--data.init_args.split.max_val_rows=8",
            "--trainer.max_steps=30",
            "--trainer.val_check_interval=30",
            f"--trainer.default_root_dir={tmp_path / 'runs' / 'tiny-lcft'}",
        ]
    )
    rows = list(
        csv.DictReader(open(tmp_path / "runs" / "tiny-lcft" / "lightning_logs" / "version_0" / "metrics.csv"))
    )
    ppl = [float(r["val/ppl@256"]) for r in rows if r.get("val/ppl@256")]
    assert len(ppl) >= 2  # validated before the stage (the CLI's first validation) and after it
    assert ppl[-1] < ppl[0]


def test_long_context_stage_on_a_model_without_rope_is_refused(tokenizer):
    gpt_bigcode = dict(model_type="gpt_bigcode", n_embd=32, n_layer=1, n_head=4)
    stage = LongContextStage(
        model=ModelSpec(config=gpt_bigcode, rope=RopeScaling(type="theta", theta=1e6)), tokenizer=tokenizer
    )
    with pytest.raises(ValueError, match="has no rescalable RoPE"):
        stage.configure_model()
