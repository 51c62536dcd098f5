"""Held-out code for the efficacy experiments: the stdlib files a recipe's split kept out of training.

The files are found with the data module's own split (``codetune.data.curation.split_of`` with the recipe's
``split`` settings and source), so nothing scored here was trained on. Two measurements use them:

- left-to-right loss: next-token NLL on plain (never FIM-transformed) files, by ``perplexity_by_length``;
- single-line infilling: one non-blank line removed from a file, the model given the code around it in a
  PSM or SPM prompt built by the training FIM code, scored by exact match (HumanEval infilling's rule) and by
  the teacher-forced loss of the true line (Bavarian et al.'s FIM test loss), which still separates models
  too small to get whole lines exactly right.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from codetune.data.curation import split_of
from codetune.data.fim import FIMConfig, FIMSplit, FIMTransform
from codetune.eval.infilling import exact_match, generate_infills, require_sentinels
from codetune.eval.perplexity import perplexity_by_length


@dataclass(frozen=True)
class HeldOutFile:
    """One validation-side file of a recipe's code source."""

    doc_id: str
    text: str


@dataclass(frozen=True)
class LineTask:
    """A single-line infilling task cut from a held-out file."""

    task_id: str
    prefix: str
    middle: str
    suffix: str


def held_out_files(datamodule: Any, source_name: str) -> list[HeldOutFile]:
    """The files of ``source_name`` that the data module's split puts on the validation side."""
    by_name = {s.name: s for s in datamodule.sources}
    if source_name not in by_name:
        raise ValueError(f"no data source named {source_name!r}; the recipe has {sorted(by_name)}")
    split = datamodule.split
    files = [
        HeldOutFile(doc.doc_id, doc.text)
        for doc in by_name[source_name].documents()
        if split_of(doc, split.val_fraction, split.seed) == "validation"
    ]
    if not files:
        raise ValueError(f"source {source_name!r} has no held-out files at val_fraction={split.val_fraction}")
    return files


def left_to_right_loss(model: Any, tokenizer: Any, files: list[HeldOutFile], length: int) -> dict[str, float]:
    """Mean next-token NLL (nats) and perplexity of ``model`` on the plain files, in windows of ``length``."""
    streams = [
        tokenizer(f.text, add_special_tokens=False, split_special_tokens=True)["input_ids"] for f in files
    ]
    report = perplexity_by_length(model, streams, [length], same_tokens=False)
    return {
        "loss": report.nll[length],
        "perplexity": report.perplexity[length],
        "tokens": report.tokens[length],
    }


def single_line_tasks(
    files: list[HeldOutFile],
    per_file: int,
    seed: int,
    max_prefix_chars: int = 480,
    max_suffix_chars: int = 240,
    max_line_chars: int = 80,
) -> list[LineTask]:
    """``per_file`` distinct single-line tasks per file, fixed by ``seed``.

    The context is cut at line boundaries to ``max_*_chars`` so a prompt stays within the short rows tiny
    models train on; lines longer than ``max_line_chars`` are not chosen (their middle would not fit the
    generation budget).
    """
    tasks = []
    for file in files:
        lines = file.text.splitlines(keepends=True)
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line))
        candidates = [i for i, line in enumerate(lines) if line.strip() and len(line) <= max_line_chars]
        rng = random.Random(f"{seed}/{file.doc_id}")
        for j, i in enumerate(rng.sample(candidates, min(per_file, len(candidates)))):
            before, after = lines[:i], lines[i + 1 :]
            prefix = _keep_last_lines(before, max_prefix_chars)
            suffix = "".join(_keep_first_lines(after, max_suffix_chars))
            tasks.append(LineTask(f"{file.doc_id}/{j}", prefix, lines[i], suffix))
    return tasks


def _keep_last_lines(lines: list[str], budget: int) -> str:
    kept: list[str] = []
    for line in reversed(lines):
        if sum(map(len, kept)) + len(line) > budget:
            break
        kept.append(line)
    return "".join(reversed(kept))


def _keep_first_lines(lines: list[str], budget: int) -> list[str]:
    kept: list[str] = []
    for line in lines:
        if sum(map(len, kept)) + len(line) > budget:
            break
        kept.append(line)
    return kept


def infilling_exact_match(
    model: Any, tokenizer: Any, tasks: list[LineTask], fim_format: str, max_new_tokens: int = 48
) -> tuple[float, list[dict[str, Any]]]:
    """Greedy infills of ``tasks`` in ``fim_format`` (psm/spm); exact match rate and per-task records."""
    sentinels = require_sentinels(tokenizer, None)
    middles = generate_infills(
        model, tokenizer, [(t.prefix, t.suffix) for t in tasks], fim_format, sentinels, max_new_tokens
    )
    records = [
        {"task_id": t.task_id, "expected": t.middle, "generated": m, "exact_match": exact_match(m, t.middle)}
        for t, m in zip(tasks, middles, strict=True)
    ]
    return sum(r["exact_match"] for r in records) / len(records), records


@torch.no_grad()
def infilling_loss(model: Any, tokenizer: Any, tasks: list[LineTask], fim_format: str) -> float:
    """Mean NLL (nats/token) of each true middle and its end sentinel after its ``fim_format`` prompt.

    The sequence is laid out by the training FIM code (``encode_split``), so the scored tokens are exactly the
    ones a FIM training row would put loss on.
    """
    transform = FIMTransform(FIMConfig(), tokenizer, require_sentinels(tokenizer, None))
    total, count = 0.0, 0
    model.eval()
    for task in tasks:
        encoded = transform.encode_split(FIMSplit(task.prefix, task.middle, task.suffix, fim_format))
        ids = torch.tensor([encoded.input_ids])
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        scored = torch.tensor(encoded.middle_mask[1:])
        total += F.cross_entropy(logits[scored], ids[0, 1:][scored], reduction="sum").item()
        count += int(scored.sum())
    return total / count
