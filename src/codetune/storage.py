"""Where codetune keeps files and how it writes them: the cache root, and writes that are atomic.

Every file or folder codetune produces (tokenizer and data caches, eval results, exports) is written under a
temporary name beside its final one and renamed into place once complete, so a crash or a kill never leaves
half a file where a reader would take it for a whole one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root(cache_dir: str | None = None) -> Path:
    """The folder codetune caches tokenizers, tokenized data and fetched files in."""
    root = cache_dir or os.environ.get("CODETUNE_CACHE") or "~/.cache/codetune"
    return Path(root).expanduser()


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder``; rename it to ``folder`` when the block succeeds.

    On failure the temporary folder is removed. If ``folder`` appeared meanwhile (another rank or process built
    the same cache), the new copy is dropped: callers use this for content-addressed folders, identical by key.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        yield tmp
        try:
            tmp.rename(folder)
        except OSError:  # written meanwhile by another process; identical by construction
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file in the same folder; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
