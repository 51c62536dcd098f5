"""Perplexity of a causal LM at several context lengths, to see whether a longer context is used.

Used by the long-context stage (validation at 1×, 2×, 4× the original length) and by
``codetune eval perplexity --lengths 1024,2048,4096``. Each length scores its own non-overlapping windows of
exactly that many tokens; by default every length scores the same text (each stream cut to a multiple of the
longest length), so the numbers differ by context only, not by data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from codetune.data.curation import split_of
from codetune.data.sources import CodeFiles


@dataclass(frozen=True)
class PerplexityReport:
    """Perplexity by context length, with what it was measured on."""

    perplexity: dict[int, float]
    """exp(mean next-token NLL) per context length."""
    nll: dict[int, float]
    """Mean next-token negative log-likelihood in nats per scored token (for averaging across shards)."""
    tokens: dict[int, int]
    """Scored tokens per length: every token of a window but its first, which has nothing to be predicted from."""
    windows: dict[int, int]
    """Number of windows of exactly that length."""


def perplexity_by_length(
    model: torch.nn.Module,
    streams: Sequence[Sequence[int]] | torch.Tensor,
    lengths: Sequence[int],
    *,
    batch_tokens: int = 8192,
    max_tokens: int | None = None,
    same_tokens: bool = True,
) -> PerplexityReport:
    """Perplexity of ``model`` on held-out token ``streams`` at each context length in ``lengths``.

    Args:
        model: a causal LM returning ``.logits`` for ``input_ids`` (transformers or peft model).
        streams: token-id sequences (documents, or one long concatenation); a window never crosses two.
            A 1-D tensor is one stream, a 2-D tensor one stream per row.
        lengths: context lengths in tokens, e.g. ``[1024, 2048, 4096]``.
        batch_tokens: tokens per forward pass; a batch holds ``max(1, batch_tokens // length)`` windows.
        max_tokens: score at most this many tokens of text (taken from the first streams).
        same_tokens: cut every stream to a multiple of the longest length so all lengths score the same text;
            if False, each length uses every full window it can.

    The loss covers every token of each window (no stride, no context-only prefix), without KV cache and
    gradients, with the model in eval mode (its mode is restored afterwards).

    Raises ValueError when no stream (or the ``max_tokens`` budget) holds the longest length, before any
    forward pass.
    """
    lengths = check_lengths(lengths)
    streams = _as_streams(streams)
    longest = lengths[-1]
    _check_ids(model, streams)
    if max_tokens is not None and max_tokens < longest:
        raise ValueError(f"max_tokens={max_tokens} is below the longest context length {longest}")
    if not any(len(stream) >= longest for stream in streams):
        longest_stream = max((len(s) for s in streams), default=0)
        raise ValueError(
            f"held-out data is shorter than the longest context length {longest}: its longest stream has "
            f"{longest_stream} tokens; drop that length, or give longer documents (or one concatenated stream)"
        )

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    report: dict[str, dict[int, float | int]] = {"perplexity": {}, "nll": {}, "tokens": {}, "windows": {}}
    try:
        for length in lengths:
            windows = _windows(streams, length, longest if same_tokens else length, max_tokens)
            per_batch = max(1, batch_tokens // length)
            nll_sum = 0.0
            for start in range(0, len(windows), per_batch):
                batch = torch.stack(windows[start : start + per_batch]).to(device)
                nll_sum += _nll_sum(model, batch)
            scored = len(windows) * (length - 1)
            report["nll"][length] = nll_sum / scored
            report["perplexity"][length] = math.exp(nll_sum / scored)
            report["tokens"][length] = scored
            report["windows"][length] = len(windows)
    finally:
        model.train(was_training)
    return PerplexityReport(**report)


@torch.no_grad()
def _nll_sum(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """Summed next-token NLL of a batch of windows, in float32."""
    logits = model(input_ids=batch, use_cache=False).logits
    total = 0.0
    # One row at a time keeps the float32 copy of the logits to a single window's worth.
    for row_logits, row in zip(logits, batch, strict=True):
        total += F.cross_entropy(row_logits[:-1].float(), row[1:], reduction="sum").item()
    return total


def _windows(
    streams: list[torch.Tensor], length: int, unit: int, max_tokens: int | None
) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``length`` tokens over each stream's first multiple of ``unit``."""
    windows: list[torch.Tensor] = []
    budget = max_tokens
    for stream in streams:
        span = len(stream) // unit * unit
        if budget is not None:
            span = min(span, budget // unit * unit)
            budget -= span
        windows.extend(stream[start : start + length] for start in range(0, span - length + 1, length))
    return windows


def check_lengths(lengths: Sequence[int]) -> list[int]:
    if isinstance(lengths, int) or not lengths:
        raise ValueError(f"lengths must be a non-empty list of context lengths, got {lengths!r}")
    for length in lengths:
        if not isinstance(length, int) or isinstance(length, bool) or length < 2:
            raise ValueError(
                f"context length {length!r} must be an integer >= 2 (one token predicts the next)"
            )
    return sorted(set(lengths))


def _as_streams(streams: Sequence[Sequence[int]] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(streams, torch.Tensor):
        if streams.dim() not in (1, 2):
            raise ValueError(f"streams tensor must be 1-D or 2-D, got shape {tuple(streams.shape)}")
        rows = [streams] if streams.dim() == 1 else list(streams)
    else:
        rows = [torch.as_tensor(stream) for stream in streams]
    for index, row in enumerate(rows):
        if row.dim() != 1 or (row.numel() and (row.is_floating_point() or row.is_complex())):
            raise ValueError(f"stream {index} must be a flat sequence of integer token ids")
    return [row.long() for row in rows]


def _check_ids(model: torch.nn.Module, streams: list[torch.Tensor]) -> None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for index, stream in enumerate(streams):
        if stream.numel() and (stream.min() < 0 or (vocab is not None and stream.max() >= vocab)):
            raise ValueError(
                f"stream {index} holds token ids outside the model's vocabulary [0, {vocab}): "
                "was it tokenized with another tokenizer?"
            )


def held_out_streams(
    tokenizer: Any,
    corpus: str = "@stdlib",
    include: Sequence[str] = ("**/*.py",),
    source_name: str = "stdlib",
    held_out_fraction: float = 0.05,
    split_seed: int = 0,
) -> list[list[int]]:
    """Token ids of every file of ``corpus`` on the validation side of the data module's split (the same hash of
    source name, fraction and seed), so a model is scored only on files it never trained on."""
    source = CodeFiles(path=corpus, include=list(include), name=source_name)
    streams = [
        tokenizer(doc.text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for doc in source.documents()
        if split_of(doc, held_out_fraction, split_seed) == "validation"
    ]
    if not streams:
        raise ValueError(
            f"no file of {corpus} ({', '.join(include)}) is on the held-out side of the split (source_name "
            f"{source_name!r}, held_out_fraction {held_out_fraction}): widen --include or match the recipe"
        )
    return streams
