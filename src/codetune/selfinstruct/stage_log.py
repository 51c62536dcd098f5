"""One stage's results on disk: an append-only JSONL keyed by item id, resumable after a crash or a kill.

A finished item is one line, written and ``fsync``-ed before the next item starts, so a rerun skips it. A kill
mid-write leaves at most the last line without its newline: on reopening it is dropped (the item is redone)
or, when it happens to be a whole record cut just before its newline, completed. A bad line anywhere else is
not a crash's trace but damage, and is an error naming its line. Beside the log, ``<stage>.settings.json``
records what produced it (model, prompt, sampling, seed, limits); continuing with different settings is
refused, since one file would then mix two experiments.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from codetune.storage import atomic_write

log = logging.getLogger(__name__)


def settings_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like settings trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [d for k in keys for d in settings_diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


class StageLog:
    """Finished items of one stage, by id, backed by an append-only JSONL file."""

    def __init__(self, path: str | Path, key: str, settings: dict[str, Any] | None) -> None:
        """Open (and check) the log at ``path``; ``settings`` None opens it to read only."""
        self.path = Path(path)
        self.key = key
        # Plain JSON, so tuples compare equal to the lists read back.
        self.settings = None if settings is None else json.loads(json.dumps(settings))
        self.settings_path = self.path.with_name(self.path.stem + ".settings.json")
        self.records: dict[str, dict[str, Any]] = {}
        self.dropped_partial_line = False
        """Whether opening dropped a partly written last line (the item it held is redone)."""
        self._settings_saved = self._check_settings()
        self._read()

    def _check_settings(self) -> bool:
        """Refuse a log made with other settings; True when the settings file already says these."""
        has_records = self.path.is_file() and self.path.stat().st_size > 0
        if self.settings is None:
            return True
        if not has_records:
            return False  # written with the first record, so a run that stops before any work leaves nothing
        if not self.settings_path.is_file():
            raise ValueError(
                f"{self.path} has results but no {self.settings_path.name} saying how they were made; "
                "move it away or use a new out_dir"
            )
        changed = settings_diff(json.loads(self.settings_path.read_text()), self.settings)
        if changed:
            raise ValueError(
                f"{self.path} was written with other settings ({', '.join(changed[:5])} changed); continue "
                f"with the settings in {self.settings_path.name}, or use a new out_dir"
            )
        return True

    def _read(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        *complete, tail = data.split(b"\n")
        for lineno, raw in enumerate(complete, start=1):
            if raw.strip():
                self._add(self._parse(raw, lineno), lineno)
        if not tail.strip():
            return
        try:
            record = json.loads(tail)
            if not isinstance(record, dict) or self.key not in record:
                raise ValueError
        except ValueError:
            self.dropped_partial_line = True
            if self.settings is None:  # read only: ignore it, the stage's own run repairs the file
                return
            log.warning(
                "%s: dropping a partly written last line (%d bytes); its item is redone",
                self.path,
                len(tail),
            )
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(tail))
            return
        if self.settings is not None:  # a whole record cut just before its newline: complete it
            with open(self.path, "ab") as f:
                f.write(b"\n")
        self._add(record, len(complete) + 1)

    def _parse(self, raw: bytes, lineno: int) -> dict[str, Any]:
        try:
            record = json.loads(raw)
        except ValueError as err:
            raise ValueError(
                f"{self.path}:{lineno}: not JSON ({err}); only a last line can be a crash's partial write, so the "
                "file was damaged: repair or remove that line"
            ) from None
        if not isinstance(record, dict) or self.key not in record:
            raise ValueError(
                f"{self.path}:{lineno}: a record without {self.key!r}; repair or remove that line"
            )
        return record

    def _add(self, record: dict[str, Any], lineno: int) -> None:
        key = str(record[self.key])
        if key in self.records:
            log.warning("%s:%d: %s %r again; the first record is used", self.path, lineno, self.key, key)
            return
        self.records[key] = record

    def __contains__(self, key: object) -> bool:
        return str(key) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Write finished items durably (one ``write``, then ``fsync``) before anything else happens."""
        records = list(records)
        if not records:
            return
        if self.settings is None:
            raise RuntimeError(f"{self.path} was opened to read only")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._settings_saved:
            atomic_write(self.settings_path, json.dumps(self.settings, indent=2) + "\n")
            self._settings_saved = True
        # ensure_ascii: a lone surrogate in generated text is escaped, not an encoding error mid-file.
        data = b"".join(json.dumps(r).encode("ascii") + b"\n" for r in records)
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for record in records:
            self.records.setdefault(str(record[self.key]), record)
