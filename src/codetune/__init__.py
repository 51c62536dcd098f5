"""codetune: fine-tune code language models (FIM, long context, instruction tuning) with Lightning."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["fit", "FitResult", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import codetune` stays cheap and the CLI's --help does not import torch twice.
    if name in ("fit", "FitResult"):
        from codetune import api

        return getattr(api, name)
    raise AttributeError(f"module 'codetune' has no attribute {name!r}")
