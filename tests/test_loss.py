"""The loss: chunked output layer + cross-entropy against the full-logits reference, and the optimizer step's
normalisation by its labelled tokens (accumulation and batch give the same gradient)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from codetune.data.batch import IGNORE_INDEX
from codetune.model.adapters import Adapter
from codetune.model.build import ModelSpec
from codetune.modules import CausalLM, FIMStage
from codetune.modules.loss import chunked_token_losses, full_logits_token_losses
from tests.conftest import TINY_LLAMA, quiet_trainer

VOCAB = 96


def rows(label_counts: list[int], length: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """One row per count; each row's last ``count`` positions carry labels (a prompt masked before them)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(label_counts), length), generator=generator)
    labels = ids.clone()
    for i, count in enumerate(label_counts):
        labels[i, : length - count] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(length).expand_as(ids).clone()}


def build(tie: bool = True, adapter: Adapter | None = None, cls=CausalLM, **kwargs):
    config = dict(TINY_LLAMA, vocab_size=VOCAB, tie_word_embeddings=tie)
    module = cls(model=ModelSpec(config=config, init_seed=0, adapter=adapter or Adapter()), **kwargs)
    module.configure_model()
    return module


def grads_of(module, loss) -> dict[str, torch.Tensor]:
    module.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "tie, adapter",
    [
        (True, None),
        (False, None),
        (False, Adapter(method="lora", r=4, dropout=0.0, modules_to_save=["lm_head"])),
    ],
    ids=["tied", "untied", "lora+head"],
)
def test_chunked_loss_and_gradients_equal_the_full_logits_reference(tie, adapter):
    module = build(tie, adapter)
    batch = rows([23, 5, 0, 12])  # an unlabelled row too
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    reference = full_logits_token_losses(module(**inputs), batch["labels"], want_correct=True)
    expected = grads_of(module, reference.total)
    for chunk in (7, 1024):  # several chunks (one of them partial), and one
        out = chunked_token_losses(module.model, batch, chunk=chunk, want_correct=True)
        assert torch.equal(out.mask, reference.mask)
        torch.testing.assert_close(out.losses, reference.losses * reference.mask, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.total, reference.total, atol=1e-4, rtol=1e-5)
        assert torch.equal(out.correct, reference.correct)
        got = grads_of(module, out.total)
        assert got.keys() == expected.keys() and len(got) >= 3
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_loss_without_gradients_and_without_labels():
    module = build()
    batch = rows([10, 3])
    with torch.inference_mode():  # how Lightning validates
        out = module.token_losses(batch)
        reference = full_logits_token_losses(module(input_ids=batch["input_ids"]), batch["labels"])
    torch.testing.assert_close(out.total, reference.total, atol=1e-4, rtol=1e-5)
    empty = module.token_losses(rows([0, 0]))
    assert float(empty.total) == 0.0 and not empty.mask.any()
    empty.total.backward()  # a batch without labels still backpropagates (zeros), as DDP needs


def test_fim_middle_accuracy_comes_from_the_chunked_loss(tokenizer):
    stage = FIMStage(
        model=ModelSpec(config=dict(TINY_LLAMA), init_seed=0), tokenizer=tokenizer, loss_chunk_tokens=5
    )
    stage.configure_model()
    batch = rows([20, 9])
    batch["input_ids"] %= len(tokenizer)
    batch["labels"] = torch.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, batch["input_ids"])
    out = stage.token_losses(batch)
    logits = stage(input_ids=batch["input_ids"])
    assert torch.equal(out.correct, (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & out.mask)


class Train(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class SeenByCallbacks(L.Callback):
    """What a callback (StepStats' grad_norm) reads in on_before_optimizer_step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norm = float(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters()]))


def one_step_update(tmp_path, batches, accumulate) -> tuple[dict[str, torch.Tensor], float]:
    """Parameter change of one SGD step (lr 1, no momentum): minus the gradient the step used; and the gradient
    norm callbacks saw."""
    module = build(optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    seen = SeenByCallbacks()
    trainer = quiet_trainer(
        tmp_path, max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0, callbacks=[seen]
    )
    trainer.fit(module, train_dataloaders=DataLoader(Train(batches), batch_size=None))
    assert trainer.global_step == 1
    return {n: before[n] - p.detach() for n, p in module.named_parameters()}, seen.norm


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(tmp_path):
    # Rows with very different label counts: a mean of per-micro-batch means would weigh the 2-label row like
    # the 23-label one (issue 19, item 8).
    counts = [23, 2, 11, 5]
    whole = rows(counts)
    singles = [{k: v[i : i + 1] for k, v in whole.items()} for i in range(len(counts))]
    batched, batched_norm = one_step_update(tmp_path / "batch", [whole], accumulate=1)
    accumulated, accumulated_norm = one_step_update(tmp_path / "accumulate", singles, accumulate=4)
    # The oracle: the gradient of the mean over all labelled tokens, from the full logits.
    module = build()
    reference = full_logits_token_losses(module(input_ids=whole["input_ids"]), whole["labels"])
    expected = grads_of(module, reference.total / reference.mask.sum())
    for name, grad in expected.items():
        torch.testing.assert_close(batched[name], grad, atol=2e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(accumulated[name], grad, atol=2e-6, rtol=1e-4, msg=name)
    norm = float(torch.nn.utils.get_total_norm(list(expected.values())))
    assert batched_norm == pytest.approx(norm, rel=1e-4) and accumulated_norm == pytest.approx(norm, rel=1e-4)
