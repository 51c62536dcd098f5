"""Writing an export folder: never half-written, never over a folder it must not replace.

The folder is written next to ``--out`` under a temporary name and renamed into place once complete, so ``--out``
is never left half-written, not even when ``--overwrite`` replaces it (the old folder is moved aside first and
deleted only after the rename).

``--overwrite`` replaces only a folder codetune wrote: every export carries :data:`MARKER`, and a non-empty folder
without it is refused, as are (marker or not) the current directory, any folder above it, a home directory, the
file-system root and a git work tree: a mistyped ``--out`` must never cost a user their files.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from codetune.checkpoints import Location

MARKER = ".codetune-export.json"
"""The file every export carries; ``--overwrite`` replaces only a folder holding it."""


def write_marker(folder: Path, source: Path) -> None:
    """Mark ``folder`` as written by ``codetune export`` (of checkpoint ``source``)."""
    (folder / MARKER).write_text(
        json.dumps({"written_by": "codetune export", "checkpoint": str(source)}) + "\n"
    )


def check_out(out: str, overwrite: bool, source: Location) -> Path:
    """``--out`` as an absolute path; refuse a non-empty folder (unless ``overwrite`` and it is an earlier export
    that is safe to replace, see :func:`check_replaceable`) or one holding the source."""
    target = Path(out).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder path")
    for path in (source.path, source.run_dir):
        if path is not None and (path.resolve() == target or path.resolve().is_relative_to(target)):
            raise ValueError(f"--out {out} contains the checkpoint being exported; choose another folder")
    if target.is_dir():
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(
                f"--out {out} is not empty; pass --overwrite to replace it (only an earlier codetune export is "
                "replaced, and the old folder is removed only after the new export is complete)"
            )
        check_replaceable(target, out)
    return target


def check_replaceable(target: Path, out: str) -> None:
    """Refuse to replace (move aside, then delete) an existing folder codetune must not delete, in one line
    naming why; an empty folder needs no marker."""
    cwd = Path.cwd().resolve()
    if target == cwd or cwd.is_relative_to(target):
        where = "the current directory" if target == cwd else f"a parent of the current directory {cwd}"
        raise ValueError(f"--out {out} is {where}; --overwrite never replaces it: export to a new folder")
    if target == Path(target.anchor) or target in _home_directories():
        raise ValueError(f"--out {out} is a home directory or the file-system root; export to a new folder")
    if (target / ".git").exists():
        raise ValueError(
            f"--out {out} is a git work tree; --overwrite never replaces it: export to a new folder"
        )
    if any(target.iterdir()) and not (target / MARKER).is_file():
        raise ValueError(
            f"--out {out} holds files codetune did not export (no {MARKER}); --overwrite replaces only an "
            "earlier export: choose a new folder, or empty this one yourself"
        )


def _home_directories() -> set[Path]:
    homes = {Path.home().resolve()}
    try:
        homes |= {Path(entry.pw_dir).resolve() for entry in pwd.getpwall() if entry.pw_dir not in ("", "/")}
    except OSError:  # no passwd database (some containers): the current user's home still counts
        pass
    return homes


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
    check_replaceable(target, str(target))  # it may have changed since the first check
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
