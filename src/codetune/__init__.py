"""codetune: fine-tune code language models (FIM, long context, instruction tuning) with Lightning.

Notebook API: ``codetune.fit``, ``codetune.preview``, ``codetune.plan``, ``codetune.export``,
``codetune.evaluate``, ``codetune.infill`` and ``codetune.compare`` (see :mod:`codetune.api`), imported on first
use so ``import codetune`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = ("fit", "FitResult", "preview", "plan", "export", "evaluate", "infill", "compare")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from codetune import api

        return getattr(api, name)
    raise AttributeError(f"module 'codetune' has no attribute {name!r}")
