"""The output layer and cross-entropy in chunks of labelled positions: the full logits never exist.

A causal LM's loss path is the largest single buffer of a long-context step: ``logits[:, :-1].float()`` of one
16,384-token row at a 32,016-token vocabulary is 2 GiB in fp32, then log-softmax keeps another copy and its
backward a third. Here the output layer (the model's own ``get_output_embeddings()`` module, peft wrappers and
tied weights included) runs only on the positions that carry a label, ``chunk`` of them at a time, and each
chunk's gradient is taken at once (by hand for the softmax, by autograd for the output layer), so at most one
chunk's logits are alive and nothing of them is kept for the backward pass. The cost is no extra matmul: the
backward pass only scales the gradients computed here by the loss's incoming gradient.

It runs inside the model's forward (a pre-hook on the output layer swaps its input for an empty slice), so the
parameters it reads are the ones FSDP2 gathered for that forward, and their gradients reach the strategy through
autograd as the full-logits path's would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from codetune.data.batch import IGNORE_INDEX, MODEL_INPUTS

DEFAULT_CHUNK_TOKENS = 1024
"""Labelled positions per chunk: peak loss memory is about ``chunk x vocab x 8`` bytes (bf16 logits, fp32
softmax, bf16 gradient), 256 MiB at a 32K vocabulary (docs/performance.md, "Loss memory")."""


@dataclass
class TokenLosses:
    """The loss of one batch, per token and in total."""

    losses: torch.Tensor
    """Per-token cross-entropy (fp32, no gradient), aligned with ``labels[:, 1:]``; 0 where unlabelled."""
    mask: torch.Tensor
    """Where ``labels[:, 1:]`` carries a label."""
    total: torch.Tensor
    """The sum of the per-token losses, differentiable (the number training backpropagates)."""
    correct: torch.Tensor | None = None
    """Where the greedy next-token prediction equals the label (bool, aligned like ``losses``), when asked."""


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(project(hidden), targets))`` with the gradients computed in the forward, chunk by chunk.

    Inputs: ``hidden`` (N, H), ``targets`` (N,), the chunk size, ``project`` (the output layer), whether to report
    greedy correctness, then the output layer's trainable parameters (so autograd routes their gradients).
    Outputs: the sum (differentiable), per-token losses (N,) and correctness (N,) (not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, targets, chunk, project, want_correct, *params):
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        correct = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        needs = [ctx.needs_input_grad[0], *ctx.needs_input_grad[5:]]
        if torch.is_inference_mode_enabled():  # grad mode stays on there, but nothing can be differentiated
            needs = [False] * len(needs)
        wanted = [p for p, need in zip(params, needs[1:], strict=True) if need]
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        grad_params: list[torch.Tensor | None] = [None] * len(wanted)
        several = n > chunk
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            t = targets[start:end]
            h = hidden[start:end].detach().requires_grad_(needs[0])
            with torch.set_grad_enabled(any(needs)):
                logits = project(h)
            z = logits.detach().float()  # fp32 softmax whatever the compute dtype (a copy unless fp32)
            if z.data_ptr() == logits.data_ptr():
                z = z.clone()  # the output layer's own output stays untouched
            lse = torch.logsumexp(z, dim=-1)
            rows = torch.arange(end - start, device=z.device)
            losses[start:end] = lse - z[rows, t]
            if want_correct:
                correct[start:end] = z.argmax(-1) == t
            inputs = ([h] if needs[0] else []) + wanted
            if not inputs:
                continue
            # d(sum ce)/d logits = softmax - one_hot(target), written over z in place.
            z.sub_(lse[:, None]).exp_()
            z[rows, t] -= 1.0
            grads = torch.autograd.grad(logits, inputs, grad_outputs=z.to(logits.dtype))
            if needs[0]:
                grad_hidden[start:end] = grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):
                if grad_params[i] is None:
                    # 16-bit parameters sum their chunks in fp32, as one matmul would accumulate them.
                    grad_params[i] = (
                        g.float() if several and g.dtype in (torch.float16, torch.bfloat16) else g
                    )
                else:
                    grad_params[i].add_(g)
        ctx.mark_non_differentiable(losses, correct)
        ctx.needs = needs
        ctx.save_for_backward(*([grad_hidden] if needs[0] else []), *grad_params)
        ctx.param_dtypes = [p.dtype for p in wanted]
        return losses.sum(), losses, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_losses, _grad_correct):
        saved = list(ctx.saved_tensors)
        grad_hidden = None
        if ctx.needs[0]:
            grad = saved.pop(0)
            grad_hidden = grad * grad_total.to(grad.dtype)
        scaled = iter(
            None if g is None else (g * grad_total).to(dtype)
            for g, dtype in zip(saved, ctx.param_dtypes, strict=True)
        )
        grads = [next(scaled) if need else None for need in ctx.needs[1:]]
        return (grad_hidden, None, None, None, None, *grads)


def linear_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.Tensor],
    chunk: int = DEFAULT_CHUNK_TOKENS,
    want_correct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of the cross-entropy of ``project(hidden)`` against ``targets`` (every one a real label), with
    per-token losses and greedy correctness; ``params`` are the trainable tensors ``project`` reads."""
    if chunk < 1:
        raise ValueError(f"loss_chunk_tokens must be >= 1, got {chunk}")
    return _LinearCrossEntropy.apply(hidden, targets, chunk, project, want_correct, *params)


def chunked_token_losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    chunk: int = DEFAULT_CHUNK_TOKENS,
    want_correct: bool = False,
) -> TokenLosses:
    """Run ``model`` on the batch and return its token losses without ever forming the full logits.

    The model's output layer is called on an empty slice; a pre-hook takes the hidden states it was given,
    keeps the positions whose next label is real and computes the loss there (:func:`linear_cross_entropy`).
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None): the chunked loss "
            "needs the output layer; set model.loss_chunk_tokens: 0 for the full-logits loss"
        )
    found: dict[str, torch.Tensor] = {}

    def before_head(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[1] != labels.shape[1]:
            raise RuntimeError(
                f"the output layer got hidden states of shape {tuple(hidden.shape)}, not (batch, "
                f"{labels.shape[1]}, hidden): this model slices before its head; set model.loss_chunk_tokens: 0"
            )
        selected = hidden[:, :-1][mask]
        params = [p for p in module.parameters() if p.requires_grad]
        total, losses, correct = linear_cross_entropy(
            selected, targets[mask], module.forward, params, chunk, want_correct
        )
        found.update(total=total, losses=losses, correct=correct)
        return (hidden[:, :0],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(before_head)
    try:
        empty = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, use_cache=False).logits
    finally:
        handle.remove()
    if "total" not in found:
        raise RuntimeError(
            "the model's forward never called its output layer; set model.loss_chunk_tokens: 0"
        )
    # The loss must hang off the model's output: FSDP2 starts its backward bookkeeping (and queues the root's
    # gradient reduction) from hooks on the forward's outputs, which the loss computed in the hook bypasses.
    # The output holds no positions, so this adds an exact zero.
    total = found["total"] + empty.sum() * 0.0 if empty.requires_grad else found["total"]
    losses = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    losses[mask] = found["losses"]
    correct = None
    if want_correct:
        correct = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
        correct[mask] = found["correct"]
    return TokenLosses(losses=losses, mask=mask, total=total, correct=correct)


def full_logits_token_losses(
    logits: torch.Tensor, labels: torch.Tensor, want_correct: bool = False
) -> TokenLosses:
    """The reference: cross-entropy over the whole ``logits`` in fp32 (what codetune computed before chunking)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    correct = (logits[:, :-1].argmax(-1) == targets) & mask if want_correct else None
    return TokenLosses(losses=losses.detach(), mask=mask, total=losses.sum(), correct=correct)
