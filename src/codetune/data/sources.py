"""Where training documents come from: code trees, JSONL, Parquet and `datasets` datasets.

Every source is a small dataclass (its fields are the recipe schema) with a ``name`` and a lazy
``documents()`` iterator of :class:`Document`. Nothing is dropped silently: whatever a source skips
is counted by reason in its :class:`SkipReport` (``source.skipped``), which the datamodule prints.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import json
import os
import re
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

STDLIB = "@stdlib"
"""Value of ``CodeFiles.path`` meaning the running interpreter's standard library sources."""

# Extension -> (language, line-comment marker). The marker is used by the metadata prefix so the
# document stays valid code in its own language.
LANGUAGES_BY_EXTENSION: dict[str, tuple[str, str]] = {
    ".py": ("python", "#"),
    ".pyi": ("python", "#"),
    ".c": ("c", "//"),
    ".h": ("c", "//"),
    ".cc": ("c++", "//"),
    ".cpp": ("c++", "//"),
    ".cxx": ("c++", "//"),
    ".hpp": ("c++", "//"),
    ".cs": ("c#", "//"),
    ".java": ("java", "//"),
    ".kt": ("kotlin", "//"),
    ".scala": ("scala", "//"),
    ".go": ("go", "//"),
    ".rs": ("rust", "//"),
    ".swift": ("swift", "//"),
    ".js": ("javascript", "//"),
    ".mjs": ("javascript", "//"),
    ".ts": ("typescript", "//"),
    ".tsx": ("typescript", "//"),
    ".php": ("php", "//"),
    ".rb": ("ruby", "#"),
    ".sh": ("shell", "#"),
    ".bash": ("shell", "#"),
    ".r": ("r", "#"),
    ".jl": ("julia", "#"),
    ".lua": ("lua", "--"),
    ".sql": ("sql", "--"),
    ".hs": ("haskell", "--"),
}
MAX_LINE_CHARS = 1_000_000
"""Longest JSON Lines record read (characters): a million characters is some 250k tokens, beyond any context."""


KNOWN_LANGUAGES = sorted({lang for lang, _ in LANGUAGES_BY_EXTENSION.values()})


@dataclass
class Document:
    """One training document and where it came from."""

    text: str
    """The document's text, exactly as it will be tokenized."""
    doc_id: str
    """Stable identifier within its source (relative path, ``file:line``, ``file:row`` or a given id)."""
    source: str
    """Name of the source that produced it."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (path, language, line, split, ...)."""


class Source(Protocol):
    """What the datamodule needs from a source."""

    name: str
    skipped: SkipReport

    def documents(self) -> Iterator[Document]: ...


MAX_LISTED_SKIPS = 100_000
"""Skipped locations kept per source for the run's ``skipped.jsonl`` (the counts are always complete)."""


@dataclass
class SkipReport:
    """What a source skipped and why: reason -> count, a few example locations per reason for one-line reports,
    every location (up to :data:`MAX_LISTED_SKIPS`) for the run's list of skipped files, and hints on a likely
    fix (e.g. the field the records hold their text in)."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3
    listed: list[tuple[str, str]] = field(default_factory=list)
    """``(reason, location)`` of each skipped item that has a location, in the order skipped."""
    hints: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str | None = None, n: int = 1) -> None:
        """Count ``n`` items skipped for ``reason``; remember ``where`` as an example."""
        self.counts[reason] = self.counts.get(reason, 0) + n
        if where is not None:
            shown = self.examples.setdefault(reason, [])
            if len(shown) < self.max_examples:
                shown.append(where)
            if len(self.listed) < MAX_LISTED_SKIPS:
                self.listed.append((reason, where))

    def hint(self, text: str) -> None:
        if text not in self.hints:
            self.hints.append(text)

    def clear(self) -> None:
        self.counts.clear()
        self.examples.clear()
        self.listed.clear()
        self.hints.clear()

    def summary(self) -> str:
        """One line: ``binary=2 (a.bin, b.bin), not_utf8=1 (x.py)`` or ``nothing skipped``."""
        if not self.counts:
            return "nothing skipped"
        parts = []
        for reason in sorted(self.counts):
            shown = self.examples.get(reason)
            extra = f" ({', '.join(shown)})" if shown else ""
            parts.append(f"{reason}={self.counts[reason]}{extra}")
        return ", ".join(parts) + "".join(f"; {h}" for h in self.hints)


def text_field_hint(record: dict[str, Any], text_field: str) -> str:
    """What to set when a record lacks ``text_field`` but holds its text under another key (``content``, ...)."""
    strings = [k for k, v in record.items() if isinstance(v, str) and k != text_field]
    if not strings:
        return f"the records have no string field besides {sorted(record)}"
    best = max(strings, key=lambda k: len(record[k]))  # the text is the longest string, not the id or path
    return f"the records hold strings under {strings[:5]}: set text_field: {best}"


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob where ``**`` spans directories and ``*``/``?`` stay within one segment.

    Written out because ``PurePath.match`` on Python < 3.13 matches from the right and treats ``**``
    like ``*``, so ``a/**/*.py`` would behave differently across supported versions.
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _stable_rank(key: str) -> int:
    """A stable pseudo-random rank for ``key`` (same on every machine and Python run)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


@dataclass
class CodeFiles:
    """A directory tree of source files, one document per file, in sorted relative-path order.

    Files are skipped (and counted in ``skipped``) when they are binary (contain a NUL byte), not
    valid UTF-8, empty or whitespace-only, outside ``min_bytes``/``max_bytes``, contain a line longer
    than ``max_line_length``, or (with ``on_error: skip``) cannot be read.
    """

    path: str
    """Root directory, or ``"@stdlib"`` for this interpreter's standard library (without
    ``site-packages`` and ``__pycache__``)."""
    name: str = "code"
    """Source name used in reports, previews and mixing weights."""
    include: list[str] = field(default_factory=lambda: ["**/*.py"])
    """Globs relative to ``path`` a file must match (``**`` spans directories)."""
    exclude: list[str] = field(default_factory=list)
    """Globs relative to ``path`` that remove files (``dir/**`` prunes a whole directory)."""
    languages: list[str] | None = None
    """Keep only these languages (by file extension, see ``LANGUAGES_BY_EXTENSION``); None keeps all."""
    min_bytes: int = 0
    """Skip files smaller than this many bytes (empty files are always skipped)."""
    max_bytes: int = 1_000_000
    """Skip files larger than this many bytes (checked before reading)."""
    max_line_length: int | None = 1000
    """Skip files with a line longer than this many characters (StarCoder's filter); None disables."""
    max_files: int | None = None
    """Keep at most this many usable files: a stable hash-of-relative-path sample (spread over the
    whole tree, unchanged when unrelated files are added), still yielded in sorted order."""
    metadata_prefix: bool = False
    """Prefix each document with its relative path as a line comment in the file's own language,
    e.g. ``# asyncio/events.py`` (the plain-text analogue of StarCoder's ``<filename>`` token, which
    keeps the document valid code and needs no new tokens)."""
    on_error: Literal["raise", "skip"] = "skip"
    """Unreadable file (permissions, vanished, I/O error): skip and count, or raise."""
    skipped: SkipReport = field(default_factory=SkipReport, init=False, repr=False, compare=False)
    """Filled while ``documents()`` runs; reset at the start of each pass."""

    def __post_init__(self) -> None:
        if not self.include:
            raise ValueError(
                f"CodeFiles {self.name!r}: include is empty; give at least one glob like '**/*.py'"
            )
        if self.languages is not None:
            unknown = sorted(set(self.languages) - set(KNOWN_LANGUAGES))
            if unknown:
                raise ValueError(
                    f"CodeFiles {self.name!r}: unknown languages {unknown}; known: {', '.join(KNOWN_LANGUAGES)}"
                )
        if self.min_bytes < 0 or self.max_bytes < max(self.min_bytes, 1):
            raise ValueError(
                f"CodeFiles {self.name!r}: need 0 <= min_bytes <= max_bytes, got {self.min_bytes}, {self.max_bytes}"
            )
        if self.max_line_length is not None and self.max_line_length < 1:
            raise ValueError(f"CodeFiles {self.name!r}: max_line_length must be >= 1 or null")
        if self.max_files is not None and self.max_files < 1:
            raise ValueError(f"CodeFiles {self.name!r}: max_files must be >= 1 or null")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(
                f"CodeFiles {self.name!r}: on_error must be 'raise' or 'skip', got {self.on_error!r}"
            )

    @property
    def root(self) -> Path:
        """The directory actually walked (``@stdlib`` resolved)."""
        if self.path == STDLIB:
            return Path(sysconfig.get_paths()["stdlib"])
        return Path(self.path).expanduser()

    def _excludes(self) -> list[str]:
        if self.path == STDLIB:
            return [*self.exclude, "site-packages/**", "**/__pycache__/**"]
        return list(self.exclude)

    def _candidates(self) -> list[str]:
        """Sorted relative POSIX paths that pass include/exclude/language (no file contents read)."""
        root = self.root
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise FileNotFoundError(
                f"CodeFiles {self.name!r}: path {str(root)!r} {what}; point 'path' at a folder"
            )
        includes = [_glob_regex(p) for p in self.include]
        excludes = [_glob_regex(p) for p in self._excludes()]
        # Patterns ending in /** exclude whole directories; prune them instead of walking them.
        prunes = [_glob_regex(p) for p in self._excludes() if p.endswith("/**")]
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            dirnames[:] = [d for d in dirnames if not any(r.match(f"{rel_dir}{d}/") for r in prunes)]
            for filename in filenames:
                rel = rel_dir + filename
                if not any(r.match(rel) for r in includes) or any(r.match(rel) for r in excludes):
                    continue
                if self.languages is not None:
                    lang = LANGUAGES_BY_EXTENSION.get(Path(rel).suffix.lower(), (None, ""))[0]
                    if lang not in self.languages:
                        self.skipped.add("language", rel)
                        continue
                found.append(rel)
        return sorted(found)

    def _read(self, rel: str) -> str | None:
        """The file's text, or None after counting why it is unusable."""
        full = self.root / rel
        try:
            info = full.stat()  # follows symlinks: what would be read
            if not stat.S_ISREG(info.st_mode):
                # A FIFO blocks forever, a link to /dev/zero never ends: only regular files are code.
                self.skipped.add("not_a_regular_file", rel)
                return None
            if info.st_size > self.max_bytes:
                self.skipped.add("too_large", rel)
                return None
            with open(full, "rb") as handle:
                data = handle.read(self.max_bytes + 1)  # a file grown since stat() still stops here
            if len(data) > self.max_bytes:
                self.skipped.add("too_large", rel)
                return None
        except OSError as err:
            if self.on_error == "raise":
                raise OSError(
                    f"CodeFiles {self.name!r}: cannot read {full}: {err}; set on_error: skip to skip it"
                ) from err
            self.skipped.add("unreadable", rel)
            return None
        if b"\x00" in data:
            self.skipped.add("binary", rel)
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.skipped.add("not_utf8", rel)
            return None
        text = text.removeprefix("\ufeff")  # a BOM is an encoding artefact, not code
        if not text.strip():
            self.skipped.add("empty", rel)
            return None
        if len(data) < self.min_bytes:
            self.skipped.add("too_small", rel)
            return None
        if self.max_line_length is not None and any(
            len(line) > self.max_line_length for line in text.splitlines()
        ):
            self.skipped.add("long_line", rel)
            return None
        return text

    def _document(self, rel: str, text: str) -> Document:
        lang, comment = LANGUAGES_BY_EXTENSION.get(Path(rel).suffix.lower(), (None, "#"))
        if self.metadata_prefix:
            text = f"{comment} {rel}\n{text}"
        return Document(text=text, doc_id=rel, source=self.name, meta={"path": rel, "language": lang})

    def documents(self) -> Iterator[Document]:
        """Yield one document per usable file, lazily, in sorted relative-path order."""
        self.skipped.clear()
        candidates = self._candidates()
        yielded = 0
        if self.max_files is None:
            for rel in candidates:
                text = self._read(rel)
                if text is not None:
                    yielded += 1
                    yield self._document(rel, text)
        else:
            # Pick the sample by hash rank, then yield it in path order (re-reading is cheap for a subset).
            chosen: list[str] = []
            ranked = sorted(candidates, key=_stable_rank)
            for i, rel in enumerate(ranked):
                if len(chosen) == self.max_files:
                    self.skipped.add("over_max_files", n=len(ranked) - i)
                    break
                if self._read(rel) is not None:
                    chosen.append(rel)
            for rel in sorted(chosen):
                text = self._read(rel)
                if text is not None:
                    yielded += 1
                    yield self._document(rel, text)
        if yielded == 0:
            raise ValueError(
                f"CodeFiles {self.name!r}: no usable files under {str(self.root)!r} "
                f"(include={self.include}, exclude={self._excludes()}, languages={self.languages}, "
                f"min_bytes={self.min_bytes}, max_bytes={self.max_bytes}, max_line_length={self.max_line_length}); "
                f"{len(candidates)} matched the globs; skipped: {self.skipped.summary()}"
            )


_GLOB_MAGIC = re.compile(r"[*?[]")


def _resolve_files(path: str, suffixes: tuple[str, ...], owner: str) -> list[tuple[Path, str]]:
    """``(file, display name)`` pairs for a file, a directory (searched recursively for ``suffixes``)
    or a glob, in sorted order; display names are relative to the directory or the glob's fixed part."""
    expanded = os.path.expanduser(path)
    if _GLOB_MAGIC.search(expanded):
        fixed = Path(_GLOB_MAGIC.split(expanded, maxsplit=1)[0]).parent
        files = sorted(Path(p) for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"{owner}: no files match {path!r}; check the glob")
        return [(f, os.path.relpath(f, fixed).replace(os.sep, "/")) for f in files]
    root = Path(expanded)
    if root.is_dir():
        files = sorted(
            (f for f in root.rglob("*") if f.is_file() and f.name.lower().endswith(suffixes)),
            key=lambda f: f.relative_to(root).as_posix(),
        )
        if not files:
            raise FileNotFoundError(f"{owner}: no {'/'.join(suffixes)} files under {path!r}")
        return [(f, f.relative_to(root).as_posix()) for f in files]
    if root.is_file():
        return [(root, root.name)]
    raise FileNotFoundError(
        f"{owner}: path {path!r} does not exist{relative_note(path)}; give a file, a folder or a glob"
    )


def relative_note(path: str) -> str:
    """For a relative data path that was not found: where it was looked for (the current directory, which is
    what a user running from another folder misses); nothing for absolute, ``@stdlib`` or URL paths."""
    if path.startswith("@") or "://" in path or Path(path).expanduser().is_absolute():
        return ""
    return (
        f" (relative to the current directory {Path.cwd()}; the shipped recipes run from the repository root)"
    )


def _open_text(path: Path) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _check_on_error(owner: str, on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"{owner}: on_error must be 'raise' or 'skip', got {on_error!r}")


@dataclass
class JsonlFiles:
    """JSON Lines files (optionally ``.gz``), one document per line, read lazily line by line.

    Blank lines are ignored. A line that is not a JSON object with a string ``text_field`` (and an
    ``id_field`` when one is set) is a bad record: an error naming ``path:line``, or skipped and
    counted with ``on_error: skip``. Records whose text is empty or whitespace are always skipped
    and counted.
    """

    path: str
    """A ``.jsonl`` file, a folder (searched recursively for ``*.jsonl`` / ``*.jsonl.gz``) or a glob."""
    name: str = "jsonl"
    """Source name used in reports, previews and mixing weights."""
    text_field: str = "text"
    """Key holding the document text."""
    id_field: str | None = None
    """Key holding a stable document id; None uses ``file:line``."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad record (or unreadable / non-UTF-8 file): raise with ``path:line``, or skip and count it."""
    max_line_chars: int = MAX_LINE_CHARS
    """Skip (and count as ``line_too_long``) records longer than this many characters, before parsing them."""
    skipped: SkipReport = field(default_factory=SkipReport, init=False, repr=False, compare=False)
    """Filled while ``documents()`` runs; reset at the start of each pass."""

    def __post_init__(self) -> None:
        _check_on_error(f"JsonlFiles {self.name!r}", self.on_error)
        if self.max_line_chars < 1:
            raise ValueError(f"JsonlFiles {self.name!r}: max_line_chars must be >= 1")

    def _bad(self, reason: str, where: str, message: str) -> None:
        bad_record(self, reason, where, message)

    def documents(self) -> Iterator[Document]:
        """Yield one document per usable line, file by file in sorted order."""
        self.skipped.clear()
        owner = f"JsonlFiles {self.name!r}"
        yielded = 0
        for file, display, lineno, where, record in jsonl_records(self, owner):
            if not isinstance(record, dict):
                self._bad("not_an_object", where, f"expected a JSON object, got {type(record).__name__}")
                continue
            text = record.get(self.text_field)
            if not isinstance(text, str):
                what = "missing" if text is None else f"a {type(text).__name__}, not a string"
                hint = text_field_hint(record, self.text_field)
                if self.on_error == "skip" and "missing_text" not in self.skipped.counts:
                    self.skipped.hint(f"missing_text: {hint}")
                self._bad("missing_text", where, f"field {self.text_field!r} is {what} ({hint})")
                continue
            if self.id_field is not None and record.get(self.id_field) is None:
                self._bad("missing_id", where, f"id field {self.id_field!r} is missing")
                continue
            if not text.strip():
                self.skipped.add("empty", where)
                continue
            doc_id = str(record[self.id_field]) if self.id_field is not None else f"{display}:{lineno}"
            yielded += 1
            yield Document(text, doc_id, self.name, {"path": str(file), "line": lineno})
        if yielded == 0:
            raise ValueError(
                f"{owner}: no usable records in {self.path!r}; skipped: {self.skipped.summary()}"
            )


def bad_record(source: Any, reason: str, where: str, message: str) -> None:
    """A bad JSON Lines record of ``source``: an error naming ``where``, or (``on_error: skip``) counted."""
    if source.on_error == "raise":
        raise ValueError(
            f"{where}: {message}; fix or delete the line, or set on_error: skip to skip bad lines"
        )
    source.skipped.add(reason, where)


def _capped_lines(handle: TextIO, limit: int) -> Iterator[str | None]:
    """The lines of ``handle``; ``None`` for each line longer than ``limit`` characters, read past in chunks."""
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or (line.endswith("\n") and len(line) == limit + 1):
            yield line
            continue
        while line and not line.endswith("\n"):
            line = handle.readline(1 << 20)
        yield None


def jsonl_records(source: Any, owner: str) -> Iterator[tuple[Path, str, int, str, Any]]:
    """``(file, display, line number, "file:line", record)`` for every parseable non-blank line of the JSON Lines
    files ``source.path`` names. Malformed lines go through :func:`bad_record`; a file that cannot be read or
    decoded is an error naming it, or (``on_error: skip``) its remaining lines are skipped and the file counted.
    A line longer than ``source.max_line_chars`` is skipped and counted (``line_too_long``) without being held in
    memory whole."""
    limit = getattr(source, "max_line_chars", None) or MAX_LINE_CHARS
    for file, display in _resolve_files(source.path, (".jsonl", ".jsonl.gz"), owner):
        try:
            with _open_text(file) as handle:
                for lineno, line in enumerate(_capped_lines(handle, limit), start=1):
                    where = f"{file}:{lineno}"
                    if line is None:  # too long to be a document (the tokenizer aborts on such lines)
                        source.skipped.add("line_too_long", where)
                        continue
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        bad_record(
                            source, "malformed_json", where, f"malformed JSON ({err.msg}, column {err.colno})"
                        )
                        continue
                    yield file, display, lineno, where, record
        except (OSError, EOFError, UnicodeDecodeError) as err:
            reason = "not_utf8_file" if isinstance(err, UnicodeDecodeError) else "unreadable_file"
            if source.on_error == "raise":
                raise ValueError(
                    f"{file}: cannot be read as UTF-8 JSON Lines ({err}); fix the file or set on_error: skip"
                ) from err
            source.skipped.add(reason, str(file))


@dataclass
class ParquetFiles:
    """Parquet files, one document per row, read lazily in record batches with pyarrow.

    Rows whose text is null are bad records (error naming ``file:row`` or, with ``on_error: skip``,
    counted); empty texts are always skipped and counted. A missing or non-string text column is an
    error before any row is read.
    """

    path: str
    """A ``.parquet`` file, a folder (searched recursively for ``*.parquet``) or a glob."""
    name: str = "parquet"
    """Source name used in reports, previews and mixing weights."""
    text_field: str = "text"
    """Column holding the document text."""
    id_field: str | None = None
    """Column holding a stable document id; None uses ``file:row`` (0-based row)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad row (null text or id) or unreadable file: raise naming it, or skip and count it."""
    batch_size: int = 1024
    """Rows per record batch read at a time (bounds memory)."""
    skipped: SkipReport = field(default_factory=SkipReport, init=False, repr=False, compare=False)
    """Filled while ``documents()`` runs; reset at the start of each pass."""

    def __post_init__(self) -> None:
        _check_on_error(f"ParquetFiles {self.name!r}", self.on_error)
        if self.batch_size < 1:
            raise ValueError(f"ParquetFiles {self.name!r}: batch_size must be >= 1")

    def _check_schema(self, file: Path, schema: Any) -> None:
        import pyarrow as pa

        for column in [self.text_field] + ([self.id_field] if self.id_field else []):
            if column not in schema.names:
                raise ValueError(
                    f"ParquetFiles {self.name!r}: {file} has no column {column!r}; columns: {', '.join(schema.names)}"
                )
        kind = schema.field(self.text_field).type
        is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
            raise ValueError(
                f"ParquetFiles {self.name!r}: {file} column {self.text_field!r} is {kind}, not a string"
            )

    def documents(self) -> Iterator[Document]:
        """Yield one document per usable row, file by file in sorted order."""
        import pyarrow.parquet as pq

        self.skipped.clear()
        owner = f"ParquetFiles {self.name!r}"
        yielded = 0
        for file, display in _resolve_files(self.path, (".parquet",), owner):
            try:
                parquet = pq.ParquetFile(file)
            except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
                if self.on_error == "raise":
                    raise ValueError(
                        f"{file}: not a readable Parquet file ({err}); fix it or set on_error: skip"
                    ) from err
                self.skipped.add("unreadable_file", str(file))
                continue
            self._check_schema(file, parquet.schema_arrow)
            columns = [self.text_field] + ([self.id_field] if self.id_field else [])
            row = 0
            for batch in parquet.iter_batches(batch_size=self.batch_size, columns=columns):
                texts = batch.column(self.text_field).to_pylist()
                ids = batch.column(self.id_field).to_pylist() if self.id_field else [None] * len(texts)
                for text, given_id in zip(texts, ids, strict=True):
                    where = f"{file}:{row}"
                    row += 1
                    if text is None or (self.id_field and given_id is None):
                        missing = self.text_field if text is None else self.id_field
                        if self.on_error == "raise":
                            raise ValueError(
                                f"{where}: {missing!r} is null; fix the row or set on_error: skip"
                            )
                        self.skipped.add("null_field", where)
                        continue
                    if not text.strip():
                        self.skipped.add("empty", where)
                        continue
                    doc_id = str(given_id) if self.id_field else f"{display}:{row - 1}"
                    yielded += 1
                    yield Document(text, doc_id, self.name, {"path": str(file), "row": row - 1})
        if yielded == 0:
            raise ValueError(f"{owner}: no usable rows in {self.path!r}; skipped: {self.skipped.summary()}")


_DATA_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


@dataclass
class HFDataset:
    """A dataset read through Hugging Face ``datasets``.

    ``path`` is tried in this order: a folder written by ``save_to_disk`` (``load_from_disk``); local
    data files (file, folder or glob of json/jsonl/parquet/csv/txt/arrow, via ``load_dataset``); else
    a Hub dataset name, which needs network access (unset ``HF_HUB_OFFLINE``) or a warm cache.
    ``streaming: true`` iterates without materialising the dataset, for corpora larger than memory or
    disk cache.
    """

    path: str
    """``save_to_disk`` folder, local data file(s) (file, folder or glob), or Hub dataset name."""
    name: str = "hf"
    """Source name used in reports, previews and mixing weights."""
    split: str = "train"
    """Split to read (for a ``save_to_disk`` folder holding a single Dataset it is only a label)."""
    text_field: str = "text"
    """Column holding the document text."""
    id_field: str | None = None
    """Column holding a stable document id; None uses ``split:index``."""
    config_name: str | None = None
    """Hub dataset configuration (``load_dataset(path, name=...)``)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    streaming: bool = False
    """Iterate lazily instead of building the Arrow cache first."""
    cache_dir: str | None = None
    """Where ``load_dataset`` keeps its Arrow cache (default: the ``datasets`` cache)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Row whose text is null or not a string: raise naming ``split:index``, or skip and count it."""
    skipped: SkipReport = field(default_factory=SkipReport, init=False, repr=False, compare=False)
    """Filled while ``documents()`` runs; reset at the start of each pass."""

    def __post_init__(self) -> None:
        _check_on_error(f"HFDataset {self.name!r}", self.on_error)

    def _local_builder(self) -> tuple[str, list[str]] | None:
        """(builder, data files) when ``path`` names local data files, else None."""
        expanded = os.path.expanduser(self.path)
        if not (_GLOB_MAGIC.search(expanded) or os.path.exists(expanded)):
            return None
        suffixes = tuple(_DATA_FILE_BUILDERS)
        files = [str(f) for f, _ in _resolve_files(self.path, suffixes, f"HFDataset {self.name!r}")]
        builders = set()
        for f in files:
            suffix = next((s for s in sorted(suffixes, key=len, reverse=True) if f.lower().endswith(s)), None)
            if suffix is None:
                raise ValueError(
                    f"HFDataset {self.name!r}: cannot tell the format of {f}; use one of {suffixes}"
                )
            builders.add(_DATA_FILE_BUILDERS[suffix])
        if len(builders) != 1:
            raise ValueError(
                f"HFDataset {self.name!r}: {self.path!r} mixes formats {sorted(builders)}; use one"
            )
        return builders.pop(), files

    def load(self) -> Any:
        """The ``datasets`` Dataset or IterableDataset for ``split`` (memory-mapped, not read yet)."""
        import datasets

        owner = f"HFDataset {self.name!r}"
        folder = Path(os.path.expanduser(self.path))
        if folder.is_dir() and any((folder / f).exists() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if self.split not in loaded:
                    raise ValueError(
                        f"{owner}: no split {self.split!r} in {self.path!r}; splits: {list(loaded)}"
                    )
                loaded = loaded[self.split]
            return loaded.to_iterable_dataset() if self.streaming else loaded
        local = self._local_builder()
        if local is not None:
            builder, files = local
            return datasets.load_dataset(
                builder,
                data_files={self.split: files},
                split=self.split,
                streaming=self.streaming,
                cache_dir=self.cache_dir,
            )
        try:
            return datasets.load_dataset(
                self.path,
                name=self.config_name,
                split=self.split,
                revision=self.revision,
                streaming=self.streaming,
                cache_dir=self.cache_dir,
            )
        except Exception as err:
            if hasattr(err, "add_note"):
                err.add_note(
                    f"{owner}: {self.path!r} is not a local path, so it was looked up on the Hugging Face Hub; "
                    "that needs network access (HF_HUB_OFFLINE unset) or the dataset already in the cache."
                )
            raise

    def documents(self) -> Iterator[Document]:
        """Yield one document per usable row in dataset order."""
        self.skipped.clear()
        owner = f"HFDataset {self.name!r}"
        dataset = self.load()
        columns = dataset.column_names
        if columns is not None:  # streaming datasets may not know their columns up front
            for column in [self.text_field] + ([self.id_field] if self.id_field else []):
                if column not in columns:
                    raise ValueError(
                        f"{owner}: no column {column!r} in {self.path!r}; columns: {', '.join(columns)}"
                    )
            dataset = dataset.select_columns([self.text_field] + ([self.id_field] if self.id_field else []))
        yielded = 0
        for index, record in enumerate(dataset):
            where = f"{self.split}:{index}"
            text = record.get(self.text_field)
            if not isinstance(text, str):
                if self.on_error == "raise":
                    raise ValueError(
                        f"{owner}: row {where} field {self.text_field!r} is {type(text).__name__}, not a string; "
                        "fix the data or set on_error: skip"
                    )
                self.skipped.add("missing_text", where)
                continue
            if not text.strip():
                self.skipped.add("empty", where)
                continue
            doc_id = str(record[self.id_field]) if self.id_field else where
            yielded += 1
            yield Document(text, doc_id, self.name, {"index": index, "hf_split": self.split})
        if yielded == 0:
            raise ValueError(
                f"{owner}: no usable rows in {self.path!r} split {self.split!r}; skipped: {self.skipped.summary()}"
            )
