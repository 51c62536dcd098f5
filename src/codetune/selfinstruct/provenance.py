"""What every generated item records about how it was made: model, backend, prompt, sampling, seed, times."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from codetune.selfinstruct.settings import Sampling


def now() -> str:
    """The current time in UTC, ISO 8601 (seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def derive_seed(seed: int, *parts: str) -> int:
    """A 31-bit seed for one generation call, fixed by the run's seed and what the call is for.

    The same chunk of the same stage draws the same samples in a rerun, whatever else ran before it.
    """
    key = "\0".join([str(seed), *parts]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big") & 0x7FFFFFFF


def provenance(
    backend: Any, sampling: Sampling, seed: int, started: str, generated: str, **extra: Any
) -> dict[str, Any]:
    """The ``provenance`` field of a stage record (``finished`` is the time the record was written)."""
    return {
        "model": getattr(backend, "model", None),
        "backend": getattr(backend, "name", type(backend).__name__),
        "sampling": asdict(sampling),
        "seed": seed,
        "started": started,
        "generated": generated,
        "finished": now(),
        **extra,
    }


def clean_text(text: str) -> str:
    """Generated text as valid UTF-8 (a lone surrogate becomes "?" rather than breaking a file later)."""
    return text.encode("utf-8", "replace").decode("utf-8", "replace") if not text.isascii() else text
