"""Packing leaks nothing between documents, through the training module's own forward and loss.

Rows come from the real data module (stdlib code, context-level FIM, so rows mix FIM and plain spans and cut
documents); the model is the training module ``CausalLM`` with its default model settings (attention kernel
``auto`` = sdpa on CPU) on a tiny Llama, in training mode. Oracle: each document span run alone.
"""

from __future__ import annotations

import pytest
import torch

from codetune.data.batch import IGNORE_INDEX
from codetune.data.datamodule import CodeDataModule
from codetune.data.fim import FIMConfig
from codetune.data.sources import CodeFiles
from codetune.model.build import ModelSpec
from codetune.modules.causal import CausalLM
from tests.conftest import TINY_LLAMA


@pytest.fixture(scope="module")
def packed(tokenizer_spec):
    dm = CodeDataModule(
        tokenizer=tokenizer_spec,
        # Small modules, so rows hold several whole documents besides the cut ones.
        sources=[CodeFiles(path="@stdlib", name="stdlib", max_bytes=1500, max_files=40)],
        seq_len=256,
        batch_size=4,
        fim=FIMConfig(level="context"),
        shuffle=False,
    )
    dm.setup("fit")
    # Rows with several spans, at least one FIM span among them.
    rows = []
    for batch, _ in dm.train_batches().batches((0, 0), documents=True):
        rows.extend(r for r in batch if len(r["documents"]) >= 3)
        if len(rows) >= 4 and any(s["fim"] for r in rows for s in r["documents"]):
            break
    assert rows, "no row with several documents"
    return dm, rows[:4]


@pytest.fixture(scope="module")
def module(packed):
    dm, _ = packed
    torch.manual_seed(0)
    lm = CausalLM(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=dm.tokenizer)
    lm.configure_model()
    lm.train()  # training mode, as in fit (dropout is 0 in the Llama config, so outputs are deterministic)
    assert lm.model.config._attn_implementation == "sdpa"
    return lm


def as_batch(row: dict, start: int = 0, end: int | None = None) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "labels", "position_ids", "token_kind", "source_index")
    return {k: torch.as_tensor(row[k][start:end], dtype=torch.long)[None] for k in keys}


def test_packed_logits_equal_each_document_run_alone(packed, module):
    _, rows = packed
    checked = 0
    with torch.no_grad():
        for row in rows:
            logits = module(**{k: v for k, v in as_batch(row).items() if k in ("input_ids", "position_ids")})
            for span in row["documents"]:
                a, b = span["start"], span["end"]
                alone = as_batch(row, a, b)
                assert alone["position_ids"][0, 0] == 0  # a span is a document (or chunk) of its own
                logits_alone = module(input_ids=alone["input_ids"], position_ids=alone["position_ids"])
                torch.testing.assert_close(logits[:, a:b], logits_alone, atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked >= 6


def test_packed_loss_is_the_token_weighted_mean_of_document_losses(packed, module):
    _, rows = packed
    with torch.no_grad():
        for row in rows:
            out = module.token_losses(as_batch(row))
            losses, mask = out.losses, out.mask
            packed_loss = losses.sum() / mask.sum()
            total, count = 0.0, 0
            for span in row["documents"]:
                alone = as_batch(row, span["start"], span["end"])
                assert alone["labels"][0, 0] == IGNORE_INDEX  # no span is trained on another's first token
                alone_out = module.token_losses(alone)
                span_losses, span_mask = alone_out.losses, alone_out.mask
                n = int(span_mask.sum())
                if n:
                    total += float(span_losses.sum() / n) * n
                    count += n
            assert count == int(mask.sum())
            assert float(packed_loss) == pytest.approx(total / count, rel=1e-5)


def test_training_step_loss_matches_the_oracle_too(packed, module):
    """The number Lightning backpropagates is the token sum of the documents' losses, over a constant unit (the
    row slots of a batch); on_before_optimizer_step divides the gradients by the step's labelled tokens."""
    _, rows = packed
    batch = {k: torch.cat([as_batch(r)[k] for r in rows[:2]]) for k in as_batch(rows[0])}
    module.log = lambda *args, **kwargs: None  # no trainer attached
    module._loss_unit = None
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        weighted = 0.0
        for row in rows[:2]:
            for span in row["documents"]:
                weighted += float(module.token_losses(as_batch(row, span["start"], span["end"])).losses.sum())
    assert float(loss) * batch["labels"][:, 1:].numel() == pytest.approx(weighted, rel=1e-5)
