"""Held-out files of your own repositories: perplexity with and without repository context, and infilling.

The files scored are the validation side of the recipe's own split (:class:`codetune.data.curation.Split`, after
its curation), so nothing scored was trained on. Their context is what repository-level training shows before a
file: the files before it in its repository's dependency order (train side or not; a context file is read, never
scored), with their headers, nearest kept when the budget runs out (for perplexity the farthest file shown is cut at
its start to fill the length; an infilling prompt shows whole files only).

**Perplexity.** Each held-out file is scored on its own code tokens (its first ones, at most half of the length,
so the other half is room for context) twice: after its header alone (``<repo_name>``
``name<file_sep>path`` or ``# repo/path``), and after the repository context plus its header. Both score exactly the
same tokens, so the difference is what the context is worth.

**Infilling.** Tasks are cut from the held-out files (``single-line``: one non-blank line; ``multi-line``: a block of
2 to 8 lines), prompted with the repository context (and without, for comparison), scored by exact match; nothing
is executed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from codetune.data.git import language_of
from codetune.data.repository import (
    RepoTokens,
    dependency_order,
    encode_pieces,
    file_pieces,
    header_pieces,
    repo_tokens,
    start_pieces,
)
from codetune.data.sources import Document
from codetune.data.tokenizer import added_bos, backend_copy
from codetune.eval.infilling import RepoContext, exact_match, generate_infills, require_sentinels

MAX_BLOCK_LINES = 8


def _marker(path: str) -> str:
    return language_of(path)[1]


@dataclass(frozen=True)
class HeldOutFile:
    """A held-out file and the files before it in its repository's dependency order."""

    doc: Document
    context: tuple[Document, ...]
    """Nearest last."""

    @property
    def repo(self) -> str:
        return str(self.doc.meta["repo"])

    @property
    def path(self) -> str:
        return str(self.doc.meta["path"])


def held_out_files(documents: Sequence[Document]) -> list[HeldOutFile]:
    """The validation-side files of curated repository documents, each with its context (all sides)."""
    by_repo: dict[str, list[Document]] = {}
    for doc in documents:
        if "repo" in doc.meta and "path" in doc.meta:
            by_repo.setdefault(str(doc.meta["repo"]), []).append(doc)
    out = []
    for repo in sorted(by_repo):
        by_path = {str(d.meta["path"]): d for d in by_repo[repo]}
        order = dependency_order({p: d.text for p, d in by_path.items()}, repo)
        for i, path in enumerate(order):
            if by_path[path].meta.get("split") == "validation":
                out.append(HeldOutFile(by_path[path], tuple(by_path[p] for p in order[:i])))
    return out


class _Encoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = backend_copy(tokenizer, text_only=True)
        self.tokens: RepoTokens | None = repo_tokens(tokenizer)
        self.bos = added_bos(tokenizer)

    def ids(self, pieces: list[tuple[int, str]]) -> list[int]:
        return encode_pieces(self.tok, pieces)[0]

    def context_ids(self, held: HeldOutFile, budget: int, whole_files: bool = True) -> tuple[list[int], int]:
        """Ids of the repository opening and of the context files that fit ``budget`` (nearest kept), and how many
        files that shows. ``whole_files=False`` fills the budget: the farthest file shown may be cut at its start
        (the left truncation long-context evaluation uses)."""
        opening = self.ids(start_pieces(held.repo, self.tokens))
        chosen: list[list[int]] = []
        used = len(opening)
        for doc in reversed(held.context):
            path = str(doc.meta["path"])
            ids = self.ids(file_pieces(held.repo, path, doc.text, self.tokens, _marker(path)))
            if used + len(ids) > budget:
                if not whole_files and budget > used:
                    chosen.insert(0, ids[len(ids) - (budget - used) :])
                break
            chosen.insert(0, ids)
            used += len(ids)
        return opening + [i for ids in chosen for i in ids], len(chosen)


@dataclass(frozen=True)
class ContextPerplexity:
    """Perplexity of held-out files' code with and without their repository context, at one length."""

    with_context: float
    without_context: float
    tokens: int
    """Code tokens scored (the same in both conditions)."""
    files: int
    context_files: float
    """Mean number of context files that fit before a held-out file."""
    context_tokens: float
    """Mean tokens of context before a held-out file's header."""


@torch.no_grad()
def _nll(model: Any, prefix: list[int], target: list[int]) -> float:
    device = next(model.parameters()).device
    ids = torch.tensor([prefix + target], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prefix) - 1 : -1].float()
    return float(F.cross_entropy(logits, ids[0, len(prefix) :], reduction="sum"))


def context_perplexity(
    model: Any, tokenizer: Any, held: Sequence[HeldOutFile], length: int
) -> ContextPerplexity:
    """Score each held-out file's code (its first tokens, up to half of ``length`` with its header) after its
    header alone and after the repository context plus its header, both within ``length`` tokens."""
    if not held:
        raise ValueError(
            "no held-out files: the recipe's split holds none of this source out (raise val_fraction)"
        )
    enc = _Encoder(tokenizer)
    was_training = model.training
    model.eval()
    totals = {"with": 0.0, "without": 0.0}
    tokens = files = 0
    context_files = context_tokens = 0
    try:
        for h in held:
            head = [enc.bos] if enc.bos is not None else []
            header = enc.ids(header_pieces(h.repo, h.path, enc.tokens, _marker(h.path)))
            opening = enc.ids(start_pieces(h.repo, enc.tokens))
            # At most half the length is scored code, so the other half is room for context at every length.
            body = enc.ids([(2, h.doc.text)])[: max(1, length // 2 - len(head) - len(opening) - len(header))]
            room = length - len(head) - len(header) - len(body)
            context, n_files = enc.context_ids(h, room, whole_files=False)
            totals["without"] += _nll(model, head + opening + header, body)
            totals["with"] += _nll(model, head + context + header, body)
            tokens += len(body)
            files += 1
            context_files += n_files
            context_tokens += len(context) - len(opening)
    finally:
        model.train(was_training)
    return ContextPerplexity(
        with_context=math.exp(totals["with"] / tokens),
        without_context=math.exp(totals["without"] / tokens),
        tokens=tokens,
        files=files,
        context_files=context_files / files,
        context_tokens=context_tokens / files,
    )


# --- infilling -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoInfillTask:
    """A gap cut from a held-out file."""

    task_id: str
    prefix: str
    middle: str
    suffix: str
    held: HeldOutFile


def infill_tasks(held: Sequence[HeldOutFile], mode: str, per_file: int, seed: int) -> list[RepoInfillTask]:
    """``per_file`` gaps per held-out file (``single-line``: one non-blank line; ``multi-line``: 2 to 8 lines),
    drawn with ``seed``; files too short for the mode give none."""
    if mode not in ("single-line", "multi-line"):
        raise ValueError(f"repository infilling modes are single-line and multi-line, got {mode!r}")
    tasks = []
    for h in held:
        lines = h.doc.text.splitlines(keepends=True)
        rng = random.Random(f"{seed}\0{h.repo}\0{h.path}")
        starts = [i for i, line in enumerate(lines) if line.strip()]
        if mode == "multi-line":
            starts = [i for i in starts if i + 2 <= len(lines)]
        seen = set()
        for _ in range(per_file * 4):
            if len(seen) == per_file or not starts:
                break
            i = rng.choice(starts)
            n = 1 if mode == "single-line" else rng.randint(2, min(MAX_BLOCK_LINES, len(lines) - i))
            if (i, n) in seen:
                continue
            seen.add((i, n))
            tasks.append(
                RepoInfillTask(
                    f"{h.repo}/{h.path}:{i + 1}",
                    "".join(lines[:i]),
                    "".join(lines[i : i + n]),
                    "".join(lines[i + n :]),
                    h,
                )
            )
    return tasks


def run_repository_infilling(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[RepoInfillTask],
    fim_format: str,
    sentinels: str | None,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_tokens: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy infills with and without repository context; exact match of each (nothing is executed)."""
    if not tasks:
        raise ValueError("no infilling tasks: the held-out files are too short for this mode")
    chosen = require_sentinels(tokenizer, sentinels)
    enc = _Encoder(tokenizer)
    contexts = []
    for t in tasks:
        room = max_prompt_tokens - len(enc.ids([(0, t.prefix + t.suffix)])) - 16
        context, n_files = enc.context_ids(t.held, room)
        files = tuple((str(d.meta["path"]), d.text) for d in t.held.context[len(t.held.context) - n_files :])
        contexts.append(RepoContext(t.held.repo, files, t.held.path))
    pieces = [(t.prefix, t.suffix) for t in tasks]
    with_context = generate_infills(
        model, tokenizer, pieces, fim_format, chosen, max_new_tokens, batch_size, contexts=contexts
    )
    alone = generate_infills(
        model,
        tokenizer,
        pieces,
        fim_format,
        chosen,
        max_new_tokens,
        batch_size,
        contexts=[RepoContext(c.repo, (), c.path) for c in contexts],
    )
    records = []
    for t, c, a, b in zip(tasks, contexts, with_context, alone, strict=True):
        records.append(
            {
                "task_id": t.task_id,
                "context_files": [p for p, _ in c.files],
                "middle": t.middle,
                "infill": a,
                "infill_without_context": b,
                "exact_match": exact_match(a, t.middle),
                "exact_match_without_context": exact_match(b, t.middle),
            }
        )
    n = len(records)
    scores = {
        "exact_match": sum(r["exact_match"] for r in records) / n,
        "exact_match_without_context": sum(r["exact_match_without_context"] for r in records) / n,
    }
    return scores, records


__all__ = [
    "ContextPerplexity",
    "HeldOutFile",
    "RepoInfillTask",
    "context_perplexity",
    "held_out_files",
    "infill_tasks",
    "run_repository_infilling",
]
