"""Which problems and examples survive: duplicates and evaluation-set look-alikes are removed, and counted.

Problems go through :class:`codetune.data.curation.Curator` (the training data's own dedup and
decontamination: exact hash, MinHash LSH near-duplicates, 13-gram overlap with HumanEval); a generated item
that repeats one of the prompt's worked examples is removed first. Kept examples (question, solution and
tests together) are checked against the evaluation sets once more, since a solution can copy a canonical
one that its question did not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from codetune.data.curation import (
    CurationConfig,
    Curator,
    Decontaminator,
    evaluation_texts,
    normalise_for_hash,
)
from codetune.data.sources import Document
from codetune.selfinstruct.problems import Problem
from codetune.selfinstruct.settings import ProblemFilter

SOURCE = "problems"


def curation_config(config: ProblemFilter) -> CurationConfig:
    """The curation settings of ``config``: no redaction, no validation split (every problem is a candidate)."""
    return CurationConfig(
        exact_dedup=config.exact_dedup,
        near_dedup=config.near_dedup,
        near_dedup_threshold=config.near_dedup_threshold,
        near_dedup_num_perm=config.near_dedup_num_perm,
        near_dedup_shingle=config.near_dedup_shingle,
        decontaminate=config.decontaminate,
        decontamination_sets=list(config.decontamination_sets),
        decontamination_ngram=config.decontamination_ngram,
        redact=False,
    )


def check_filter(config: ProblemFilter) -> Curator:
    """Build the curator now, so a missing ``datasketch`` or decontamination file fails before any work."""
    try:
        return Curator(curation_config(config))
    except ImportError:
        raise ValueError(
            "filtering.near_dedup needs datasketch: pip install 'codetune[dedup]' (or set filtering.near_dedup: false)"
        ) from None


def filter_problems(
    problems: Sequence[Problem], config: ProblemFilter, examples: Sequence[str] = ()
) -> tuple[list[Problem], dict[str, Any]]:
    """The problems kept (first occurrences, in order) and what was removed, by reason, with a few ids each.

    ``unique`` counts problems left after removing duplicates; ``contaminated`` those removed for sharing an
    n-gram with an evaluation set (checked first, so a contaminated copy counts as contaminated); ``kept`` is
    the difference.
    """
    seen_examples = {normalise_for_hash(e).lower() for e in examples}
    removed: dict[str, int] = {}
    shown: dict[str, list[str]] = {}
    candidates = []
    for p in problems:
        if normalise_for_hash(p.question).lower() in seen_examples:
            removed["prompt_example"] = removed.get("prompt_example", 0) + 1
            shown.setdefault("prompt_example", []).append(p.id)
            continue
        candidates.append(p)
    stream, report = check_filter(config).run(Document(p.question, p.id, SOURCE) for p in candidates)
    kept_ids = {doc.doc_id for doc in stream}  # consuming the stream fills the report
    for reason, n in report.removed.items():
        removed[reason] = removed.get(reason, 0) + n
        shown[reason] = [e.removeprefix(f"{SOURCE}:") for e in report.examples.get(reason, [])]
    kept = [p for p in candidates if p.id in kept_ids]
    duplicates = sum(removed.get(k, 0) for k in ("prompt_example", "exact_duplicate", "near_duplicate"))
    summary = {
        "seen": len(problems),
        "unique": len(problems) - duplicates,
        "contaminated": removed.get("contaminated", 0),
        "removed": removed,
        "examples": {k: v[:3] for k, v in shown.items()},
        "kept": len(kept),
    }
    return kept, summary


def example_decontaminator(config: ProblemFilter) -> Decontaminator | None:
    """The n-gram matcher kept examples are checked with (None when decontamination is off)."""
    if not config.decontaminate:
        return None
    texts: dict[str, str] = {}
    for entry in config.decontamination_sets:
        texts.update(evaluation_texts(entry))
    return Decontaminator(texts, config.decontamination_ngram)
