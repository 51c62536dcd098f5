"""Mixing sources by token shares: Code Llama - Instruct's rehearsal (instruct 92%, code 6%, language 2%).

Each source is packed into rows on its own, with its own objective (FIM for code, masked chat for instructions),
and whole rows are interleaved, as Megatron-LM's blended datasets interleave samples: the next row always comes
from the source furthest behind its target share of real (non-pad) tokens, ``argmax_s (w_s * T - T_s)``. The
schedule is deterministic (no random draw), and every source's realised share stays within one row of its
target at every point of the stream: ``|T_s - w_s * T| <= seq_len``, i.e. within ``seq_len / T`` of the weight.

Weights must sum to 1 (within 1e-6): a typo such as 0.92 / 0.06 / 0.2 is an error naming the sum and the
normalised shares, not a silent renormalisation that would quietly change the recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from codetune.data.batch import real_tokens

_WEIGHT_TOLERANCE = 1e-6

Stop = Literal["first_exhausted", "all_exhausted", "each_once"]


@dataclass
class MixConfig:
    """How several sources share the training rows."""

    weights: dict[str, float] | None = None
    """Share of real tokens per source name, summing to 1 (e.g. ``{instruct: 0.92, code: 0.06, nl: 0.02}``).
    None: every source once, in its natural proportion (not available with ``streaming``)."""
    stop: Stop = "first_exhausted"
    """When a pass ends: ``first_exhausted`` ends it when any source runs out (nothing repeats);
    ``all_exhausted`` repeats sources that run out until each has run out once; ``each_once`` drops sources
    that run out and goes on until all have (every row once; shares hold only while all last)."""
    num_tokens: int | None = None
    """Instead of ``stop``: mix exactly this many real tokens, repeating any source that runs out."""

    def __post_init__(self) -> None:
        if self.stop not in ("first_exhausted", "all_exhausted", "each_once"):
            raise ValueError(
                f"mix.stop must be first_exhausted, all_exhausted or each_once, got {self.stop!r}"
            )
        if self.num_tokens is not None and self.num_tokens < 1:
            raise ValueError(f"mix.num_tokens must be >= 1 or null, got {self.num_tokens}")
        if self.weights is not None:
            for name, weight in self.weights.items():
                if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"mix.weights[{name!r}] must be a finite number >= 0, got {weight!r}")


def check_weights(weights: dict[str, float], source_names: Sequence[str]) -> dict[str, float]:
    """The weights as floats, after checking they name exactly the sources and sum to 1."""
    unknown = sorted(set(weights) - set(source_names))
    missing = [n for n in source_names if n not in weights]
    if unknown or missing:
        parts = [f"unknown {unknown}" if unknown else "", f"missing {missing}" if missing else ""]
        raise ValueError(
            f"mix.weights must name every source exactly once ({'; '.join(p for p in parts if p)}); "
            f"the sources are {list(source_names)}"
        )
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("mix.weights are all 0; give at least one source a positive share")
    if abs(total - 1.0) > _WEIGHT_TOLERANCE:
        suggestion = ", ".join(f"{n}: {w / total:.4g}" for n, w in weights.items())
        raise ValueError(
            f"mix.weights sum to {total:.6g}, not 1: they are token shares. Normalised they would be "
            f"{{{suggestion}}}; write those if that is what you mean"
        )
    return {n: float(weights[n]) for n in source_names}


@dataclass
class MixStats:
    """What a mix produced, per source."""

    tokens: dict[str, int] = field(default_factory=dict)
    """Real tokens taken from each source."""
    rows: dict[str, int] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    """Passes started over each source (more than 1: it was repeated)."""

    def shares(self) -> dict[str, float]:
        total = sum(self.tokens.values())
        return {n: (t / total if total else 0.0) for n, t in self.tokens.items()}


class RowMixer:
    """Interleaves rows of several sources by token shares (see the module docstring)."""

    def __init__(
        self, weights: dict[str, float], stop: Stop = "first_exhausted", num_tokens: int | None = None
    ) -> None:
        self.weights = dict(weights)
        self.stop = stop
        self.num_tokens = num_tokens
        self.stats = MixStats()

    def mix(self, open_pass: Callable[[str, int], Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        """Yield rows; ``open_pass(name, k)`` gives the rows of pass ``k`` over source ``name``."""
        active = [n for n, w in self.weights.items() if w > 0]
        order = {n: i for i, n in enumerate(active)}
        streams = {n: open_pass(n, 0) for n in active}
        stats = self.stats
        for n in active:
            stats.tokens.setdefault(n, 0)
            stats.rows.setdefault(n, 0)
            stats.passes[n] = 1
        ran_out: set[str] = set()
        total = 0
        while active:
            if self.num_tokens is not None and total >= self.num_tokens:
                return
            # The source furthest behind its share; ties go to the larger weight, then to the earlier source.
            name = max(
                active, key=lambda n: (self.weights[n] * total - stats.tokens[n], self.weights[n], -order[n])
            )
            row = next(streams[name], None)
            if row is None:
                ran_out.add(name)
                if self.num_tokens is None:
                    if self.stop == "first_exhausted":
                        return
                    if self.stop == "each_once":
                        active.remove(name)
                        continue
                    if ran_out.issuperset(active):  # all_exhausted
                        return
                streams[name] = open_pass(name, stats.passes[name])
                stats.passes[name] += 1
                row = next(streams[name], None)
                if row is None:
                    raise ValueError(f"source {name!r} has no rows to mix")
            n_real = int(real_tokens(row).sum())
            stats.tokens[name] += n_real
            stats.rows[name] += 1
            total += n_real
            yield row


__all__ = ["MixConfig", "MixStats", "RowMixer", "check_weights"]
