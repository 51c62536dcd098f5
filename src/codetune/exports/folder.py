"""Writing an export folder: never half-written, never over a folder it must not replace.

The folder is written next to ``--out`` under a temporary name and renamed into place once complete, so ``--out``
is never left half-written, not even when ``--overwrite`` replaces it (the old folder is moved aside first and
deleted only after the rename).
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from codetune.checkpoints import Location


def check_out(out: str, overwrite: bool, source: Location) -> Path:
    """``--out`` as an absolute path; refuse a non-empty folder (unless ``overwrite``) or one holding the source."""
    target = Path(out).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder path")
    for path in (source.path, source.run_dir):
        if path is not None and (path.resolve() == target or path.resolve().is_relative_to(target)):
            raise ValueError(f"--out {out} contains the checkpoint being exported; choose another folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out} is not empty; pass --overwrite to replace it (the old folder is removed only after "
            "the new export is complete)"
        )
    return target


@contextmanager
def staged_folder(target: Path, overwrite: bool):
    """Yield a fresh folder next to ``target``; on success rename it to ``target``, on failure delete it.

    With ``overwrite`` the old folder is moved aside first and deleted only after the rename, so at every
    moment ``target`` is either the complete old export, the complete new one, or (for an instant) absent.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _usual_permissions(tmp)
        _publish(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _usual_permissions(folder: Path) -> None:
    """Give every file the mode a plain ``open`` would (transformers writes shards owner-only, 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        tmp.rename(target)
        return
    if any(target.iterdir()) and not overwrite:  # it was filled while we exported
        raise FileExistsError(f"--out {target} was filled while exporting; pass --overwrite to replace it")
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
