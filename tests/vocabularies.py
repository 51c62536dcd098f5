"""Real code-model vocabularies for tests, from llama.cpp's pinned source archive (see codetune.llama_cpp).

The first use downloads the archive from PyPI (77 MB, checksum pinned) into ``$CODETUNE_CACHE``; a machine that
cannot reach PyPI and has no copy (``CODETUNE_LLAMA_CPP_SDIST``) skips the tests that need one, saying why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from codetune.llama_cpp import LlamaCppUnavailable, tokenizer_folder


def vocabulary(name: str) -> Path:
    """The Hugging Face tokenizer folder of llama.cpp's vocabulary ``name``, or a skip with the reason."""
    try:
        return tokenizer_folder(name)
    except LlamaCppUnavailable as err:
        pytest.skip(f"llama.cpp vocabulary {name!r} unavailable: {err}")
