"""Batched generation with a Hugging Face causal LM, for every eval: left padding, stop strings, seeded sampling.

Models are loaded by :func:`codetune.checkpoints.load_trained` alone (exported folder, training
checkpoint or run directory), so the accepted ``--model`` forms change in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One generated continuation."""

    text: str
    """Decoded new text, cut before the first stop string."""
    new_tokens: int
    """Tokens generated, the stop token included (what the compute was spent on)."""
    finish: str
    """``stop`` (a stop string or stop token ended it) or ``length`` (``max_new_tokens`` reached)."""


def truncate_at_stop(text: str, stops: Sequence[str], context: str = "") -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; ``context`` (the prompt's end) may hold a stop's start.

    Returns the kept text and whether a stop string was found.
    """
    if not stops:
        return text, False
    tail = context[-(max(map(len, stops)) - 1) :] if max(map(len, stops)) > 1 else ""
    joined = tail + text
    cut = min((i for i in (joined.find(s) for s in stops) if i >= 0), default=-1)
    if cut < 0:
        return text, False
    return text[: max(0, cut - len(tail))], True


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 0.95,
    num_samples: int = 1,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    batch_size: int = 8,
    seed: int = 0,
    add_special_tokens: bool = True,
    decode: Callable[[list[int]], str] | None = None,
) -> list[list[Sample]]:
    """Continue each prompt ``num_samples`` times; returns one list of :class:`Sample` per prompt.

    Prompts are strings (tokenized here) or token ids (used as given, e.g. FIM prompts built by the data
    code). ``temperature`` 0 is greedy. Generation stops at the tokenizer's EOS, at ``stop_token_ids`` and,
    per sequence, at ``stop`` strings (checked on the fly and cut post hoc). ``decode`` turns new ids into
    text (default: the tokenizer's decode without special tokens).
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1 or num_samples < 1 or batch_size < 1:
        raise ValueError("max_new_tokens, num_samples and batch_size must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0 and num_samples > 1:
        raise ValueError(f"greedy decoding would give {num_samples} identical samples: set temperature > 0")
    ids = [
        list(p)
        if not isinstance(p, str)
        else tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        for p in prompts
    ]
    if any(len(p) == 0 for p in ids):
        raise ValueError("an empty prompt cannot be continued; give at least one token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; left padding needs one")
    # The model's own end tokens too: chat models often end a turn with a token other than the tokenizer's EOS.
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    model_eos = list(model_eos) if isinstance(model_eos, (list, tuple)) else [model_eos]
    eos = list(
        dict.fromkeys(t for t in (tokenizer.eos_token_id, *model_eos, *stop_token_ids) if t is not None)
    )
    decode = decode or (lambda new: tokenizer.decode(new, skip_special_tokens=True))
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        num_return_sequences=num_samples,
        eos_token_id=eos or None,
        pad_token_id=pad_id,
        stop_strings=list(stop) or None,
        use_cache=True,
    )
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch (less padding) and an out-of-memory shows up at once.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    results: list[list[Sample]] = [[] for _ in ids]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout while generating (an in-training eval hands over a training model)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                attention_mask[row, width - len(ids[i]) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                tokenizer=tokenizer if stop else None,
            )
            new = out[:, width:].tolist()
            for row, i in enumerate(batch):
                context = prompts[i] if isinstance(prompts[i], str) else ""
                for j in range(num_samples):
                    results[i].append(_sample(new[row * num_samples + j], eos, pad_id, decode, stop, context))
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return results


def _sample(
    new: list[int], eos: list[int], pad_id: int, decode: Callable, stop: Sequence[str], context: str
) -> Sample:
    end = next((n for n, t in enumerate(new) if t in eos), None)
    if end is not None:
        kept, produced = new[:end], end + 1
    else:
        # A sequence a stop string ended is padded to the batch's length (pad != eos here).
        kept = list(new)
        while kept and kept[-1] == pad_id:
            kept.pop()
        produced = len(kept)
    text, stopped = truncate_at_stop(decode(kept), stop, context)
    return Sample(text=text, new_tokens=produced, finish="stop" if end is not None or stopped else "length")
