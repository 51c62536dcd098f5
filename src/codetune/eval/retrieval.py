"""Long-context key retrieval (Code Llama, Rozière et al. 2023, App. G.2).

A function ``def my_function() -> int`` returning a random two-digit value is inserted at a relative
position of a long context of real code (the Python standard library by default); the prompt ends in
``assert my_function() ==`` and the model must complete the value. Accuracy is reported per (context
length in tokens, relative position): a model whose long-context fine-tuning worked keeps it high at every
position of the trained lengths.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from codetune.data.sources import CodeFiles
from codetune.eval.generate import generate

log = logging.getLogger(__name__)

KEY_FUNCTION = (
    'def my_function() -> int:\n    """Note that this function is used at the end."""\n    return {value}\n'
)
# No trailing space: in code the space belongs to the value's token (byte-level BPE "Ġ42"; SentencePiece "▁4"), so
# a prompt ending in a lone space token is one the model never saw; it ends where the training text has a boundary.
QUESTION = "assert my_function() =="
DEFAULT_POSITIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class RetrievalTask:
    """One prompt: code context with the key function inside, ending in the question."""

    length: int
    """Target prompt length in tokens."""
    position: float
    """Requested relative position of the key function in the context (0 = start, 1 = just before the question)."""
    value: int
    """The answer: what ``my_function`` returns."""
    input_ids: list[int]
    key_token: int
    """Index of the first token of the key function in ``input_ids``."""
    context_tokens: int
    """Tokens of code context around the key function (the prompt minus key function and question)."""


def load_corpus(corpus: str = "@stdlib", max_files: int = 300) -> list[str]:
    """Code files for the context, from a folder or ``@stdlib`` (through the training data source)."""
    files = CodeFiles(path=corpus, name="retrieval-context", max_files=max_files, max_line_length=200)
    texts = [d.text for d in files.documents() if "my_function" not in d.text]
    if not texts:
        raise ValueError(f"retrieval corpus {corpus!r}: no usable code files")
    return texts


def build_task(
    tokenizer: Any, corpus: Sequence[str], length: int, position: float, rng: random.Random
) -> RetrievalTask:
    """A prompt of about ``length`` tokens (never more) with the key function at ``position`` of its context.

    The context is shuffled corpus files cut to the token budget. The key function goes at a line start
    (where the code stays well-formed) within 2% of the requested position, or else splits the line there.
    """
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"retrieval position must be in [0, 1], got {position}")
    value = rng.randint(10, 99)
    key = KEY_FUNCTION.format(value=value)
    overhead = len(tokenizer(key + QUESTION, add_special_tokens=True)["input_ids"])
    budget = length - overhead - 2  # room for the newlines added at the two cuts
    if budget < 16:
        raise ValueError(
            f"retrieval length {length} is too short: the key function and question take {overhead} tokens"
        )
    filler = _filler(tokenizer, corpus, budget, rng)
    offsets = tokenizer(filler, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = len(offsets)
    target = round(position * n)
    line_starts = [i for i, (a, _) in enumerate(offsets) if a == 0 or filler[a - 1] == "\n"] + [n]
    nearest = min(line_starts, key=lambda i: abs(i - target))
    at = nearest if abs(nearest - target) <= max(1, n // 50) else target
    cut = offsets[at][0] if at < n else len(filler)
    head, tail = filler[:cut], filler[cut:]
    head += "\n" if head and not head.endswith("\n") else ""
    tail += "\n" if tail and not tail.endswith("\n") else ""
    text = head + key + tail + QUESTION
    full = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = full["input_ids"]
    key_token = next(i for i, (a, b) in enumerate(full["offset_mapping"]) if b > len(head) and b > a)
    return RetrievalTask(
        length=length,
        position=position,
        value=value,
        input_ids=ids,
        key_token=key_token,
        context_tokens=len(ids) - overhead,
    )


def _filler(tokenizer: Any, corpus: Sequence[str], budget: int, rng: random.Random) -> str:
    """The first ``budget`` tokens of the corpus files in a shuffled order (may end inside a line)."""
    order = list(range(len(corpus)))
    rng.shuffle(order)
    text, tokens = "", 0
    for i in order:
        text += corpus[i].rstrip("\n") + "\n\n"
        tokens += len(tokenizer(corpus[i], add_special_tokens=False)["input_ids"])
        if tokens >= budget + 64:  # per-file counts are approximate at file joins: keep a margin
            break
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= budget:
        raise ValueError(f"retrieval corpus holds only {len(offsets)} tokens, fewer than the {budget} needed")
    return text[: offsets[budget][0]]


def build_tasks(
    tokenizer: Any,
    corpus: Sequence[str],
    lengths: Sequence[int],
    positions: Sequence[float] = DEFAULT_POSITIONS,
    samples: int = 1,
    seed: int = 0,
) -> list[RetrievalTask]:
    """``samples`` tasks per (length, position), each with its own value and context, fixed by ``seed``."""
    return [
        build_task(tokenizer, corpus, length, position, random.Random(f"{seed}/{length}/{position}/{s}"))
        for length in lengths
        for position in positions
        for s in range(samples)
    ]


def parse_answer(text: str) -> int | None:
    """The integer a completion of ``assert my_function() ==`` states (after its space), if any."""
    match = re.match(r"\s*(-?\d+)", text)
    return int(match.group(1)) if match else None


def score_retrieval(
    tasks: Sequence[RetrievalTask], answer: Callable[[list[RetrievalTask]], list[str]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy per (length, position) of the completions ``answer`` gives for ``tasks``."""
    completions = answer(list(tasks))
    if len(completions) != len(tasks):
        raise ValueError(f"got {len(completions)} answers for {len(tasks)} retrieval tasks")
    records = []
    for task, text in zip(tasks, completions, strict=True):
        got = parse_answer(text)
        records.append(
            {
                "length": task.length,
                "position": task.position,
                "prompt_tokens": len(task.input_ids),
                "key_token": task.key_token,
                "value": task.value,
                "completion": text,
                "answer": got,
                "correct": got == task.value,
            }
        )
    cells: dict[str, dict[str, list[bool]]] = {}
    for rec in records:
        cells.setdefault(str(rec["length"]), {}).setdefault(f"{rec['position']:g}", []).append(rec["correct"])
    accuracy = {length: {pos: sum(v) / len(v) for pos, v in row.items()} for length, row in cells.items()}
    scores = {"accuracy": accuracy, "mean": sum(r["correct"] for r in records) / len(records)}
    return scores, records


def run_retrieval(
    model: Any,
    tokenizer: Any,
    corpus: Sequence[str],
    lengths: Sequence[int],
    positions: Sequence[float] = DEFAULT_POSITIONS,
    samples: int = 1,
    max_new_tokens: int = 4,
    batch_size: int = 1,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build, generate and score retrieval prompts with an in-memory model (also for in-training evals)."""
    tasks = build_tasks(tokenizer, corpus, lengths, positions, samples, seed)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and max(lengths) + max_new_tokens > max_positions:
        log.warning(
            "retrieval: prompts of %d tokens exceed the model's max_position_embeddings=%d",
            max(lengths),
            max_positions,
        )

    def answer(batch: list[RetrievalTask]) -> list[str]:
        out = generate(
            model, tokenizer, [t.input_ids for t in batch], max_new_tokens=max_new_tokens,
            batch_size=batch_size, seed=seed,
        )  # fmt: skip
        return [s[0].text for s in out]

    return score_retrieval(tasks, answer)
