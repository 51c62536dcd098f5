"""The curated, tokenized corpus: every source read once, curated together, tokenized with ``datasets.map``.

Curation runs over all sources in one pass (cross-source dedup, then the train/validation split), before any
sharding. The surviving documents are written to an Arrow file and tokenized by ``datasets.map`` (``num_proc``
processes) into Arrow files under ``cache_root()/data/corpus-<key>``. The key hashes the tokenizer, every
source's settings and the size and modification time of its files, the curation settings and how each source
is encoded, so a second run with the same inputs loads the cache and neither reads nor tokenizes anything.

Encoding per objective (the same code serves the streaming path, one document at a time):

* ``fim`` and ``causal``: plain ids with special-token matching off (a literal ``<PRE>`` in code stays text),
  a BOS exactly when the tokenizer adds one, and for context-level FIM each token's character span;
* ``chat``: :class:`codetune.data.chat.ChatEncoder` ids and labels (-100 outside assistant turns).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np

from codetune.data.chat import ChatEncoder, ChatFiles
from codetune.data.curation import CurationConfig, CurationReport, Curator, Side, Split
from codetune.data.git import GitRepos
from codetune.data.packing import PackDocument
from codetune.data.repository import RepositoryAssembler, encode_pieces, layout_pieces
from codetune.data.sources import CodeFiles, Document, SkipReport
from codetune.data.tokenizer import added_bos, backend_copy
from codetune.storage import atomic_folder

log = logging.getLogger(__name__)

Objective = Literal["fim", "causal", "chat"]
CORPUS_FORMAT = 3  # 2: repository documents carry their layout; 3: the skipped list (skipped.jsonl) and hints
REPEAT_STRIDE = 1 << 40
"""Pass ``k`` over a source numbers its documents from ``k * REPEAT_STRIDE``, so a repeated document gets a
fresh FIM draw (draws are keyed by source and ordinal)."""


# --- encoding ------------------------------------------------------------------------------------------


class DocumentEncoder:
    """Tokenizes documents for their source's objective; one instance per run, picklable for workers."""

    def __init__(
        self,
        tokenizer: Any,
        objectives: dict[str, Objective],
        offsets: bool,
        chat_template: str = "codetune",
        repository: RepositoryAssembler | None = None,
    ) -> None:
        self.objectives = dict(objectives)
        self.repository = repository
        """Joins the files of repository sources into repository documents after curation (None: no such source)."""
        self.offsets = offsets
        self._plain = backend_copy(tokenizer, text_only=True)  # code is text: `<PRE>` in a file stays text
        self.bos_id = added_bos(tokenizer)
        self.chat = ChatEncoder(tokenizer, chat_template) if "chat" in self.objectives.values() else None

    def encode_batch(
        self, sources: Sequence[str], texts: Sequence[str], layouts: Sequence[Sequence[int]] | None = None
    ) -> dict[str, list[list[int]]]:
        """``input_ids``, ``labels`` (empty: train on every token) and flat ``offsets`` (empty: none) per text.

        A text with a non-empty layout (a repository document) is encoded piece by piece: its repository and
        file tokens become their single ids, its code stays text."""
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "offsets": []}
        laid_out = {i for i, layout in enumerate(layouts or []) if len(layout)}
        plain = [i for i, s in enumerate(sources) if self.objectives[s] != "chat" and i not in laid_out]
        encoded = dict(
            zip(
                plain,
                self._plain.encode_batch([texts[i] for i in plain], add_special_tokens=False),
                strict=True,
            )
        )
        for i in laid_out:
            assert layouts is not None
            ids, spans = encode_pieces(self._plain, layout_pieces(texts[i], layouts[i]))
            encoded[i] = _Encoded(ids, spans)
        for i, source in enumerate(sources):
            if i in encoded:
                enc = encoded[i]
                ids = list(enc.ids)
                spans = enc.offsets if self.offsets and self.objectives[source] == "fim" else None
                if self.bos_id is not None:
                    ids.insert(0, self.bos_id)
                    spans = None if spans is None else [(0, 0), *spans]
                out["input_ids"].append(ids)
                out["labels"].append([])
                out["offsets"].append([] if spans is None else [p for span in spans for p in span])
            else:
                assert self.chat is not None
                ids, labels = self.chat.encode_text(texts[i])
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                out["offsets"].append([])
        return out

    def pack_document(
        self,
        source: str,
        doc_id: str,
        ordinal: int,
        text: str,
        encoded: dict[str, Any],
        layout: Sequence[int] | None = None,
    ) -> PackDocument:
        """The packer's view of an encoded document (text only where FIM may use it).

        ``encoded`` holds ``input_ids``, ``labels`` and flat ``offsets`` as lists or numpy arrays.
        """
        objective = self.objectives[source]
        flat = np.asarray(encoded["offsets"], dtype=np.int64)
        offsets = list(zip(flat[0::2].tolist(), flat[1::2].tolist(), strict=True)) if len(flat) else None
        return PackDocument(
            source=source,
            doc_id=doc_id,
            ordinal=ordinal,
            input_ids=np.asarray(encoded["input_ids"]).tolist(),
            labels=np.asarray(encoded["labels"]).tolist() if objective == "chat" else None,
            text=text if objective == "fim" else None,
            offsets=offsets,
            layout=[int(v) for v in layout] if layout is not None and len(layout) else None,
        )


@dataclass
class _Encoded:
    """A repository document's encoding, shaped like a ``tokenizers.Encoding`` for :meth:`encode_batch`."""

    ids: list[int]
    offsets: list[tuple[int, int]]


# --- cache keys ----------------------------------------------------------------------------------------


def _config_of(obj: Any) -> Any:
    if is_dataclass(obj):
        return {"type": type(obj).__name__, **{k: v for k, v in asdict(obj).items() if k != "skipped"}}
    return obj


def _files_of(source: Any) -> list[tuple[str, int, int]] | None:
    """``(path, size, mtime_ns)`` of every file a source may read, or None for a remote dataset."""
    if hasattr(source, "fingerprint"):  # e.g. GitRepos: the commits read
        return source.fingerprint()
    if isinstance(source, CodeFiles):
        root = source.root
        names = source._candidates()  # the globbed file list, without reading any file
        paths = [root / n for n in names]
    else:
        path = os.path.expanduser(str(getattr(source, "path", "")))
        if any(c in path for c in "*?["):
            import glob

            paths = [Path(p) for p in sorted(glob.glob(path, recursive=True))]
        elif os.path.isdir(path):
            paths = sorted(p for p in Path(path).rglob("*") if p.is_file())
        elif os.path.isfile(path):
            paths = [Path(path)]
        else:
            return None  # a Hub name: its revision (in the config) is the fingerprint
    stats = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        stats.append((str(p), st.st_size, st.st_mtime_ns))
    return stats


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything that decides token ids (vocabulary, merges, added tokens, normaliser, templates)."""
    parts = [tokenizer.backend_tokenizer.to_str(), str(getattr(tokenizer, "bos_token_id", None))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def corpus_key(
    tokenizer: Any,
    sources: Sequence[Any],
    curation: CurationConfig,
    split: Split,
    objectives: dict[str, Objective],
    offsets: bool,
    chat_template: str,
    repository: RepositoryAssembler | None = None,
) -> str:
    """Cache key of the tokenized corpus (see the module docstring for what goes in)."""
    description = {
        "format": CORPUS_FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": [{"config": _config_of(s), "files": _files_of(s)} for s in sources],
        "curation": asdict(curation),
        "split": [split.val_fraction, split.seed],
        "objectives": objectives,
        "offsets": offsets,
        "chat_template": chat_template if "chat" in objectives.values() else None,
        "repository": None
        if repository is None
        else {
            "tokens": asdict(repository.tokens) if repository.tokens else None,
            "budgets": repository.budgets,
        },
    }
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


# --- the corpus ----------------------------------------------------------------------------------------


@dataclass
class CorpusReport:
    """What reading and curating the sources removed, kept for the summary even when the corpus is cached."""

    skipped: dict[str, dict[str, int]]
    """Source name -> reason -> files or records skipped while reading."""
    curation: dict[str, Any]
    """The :class:`CurationReport` as a dict."""
    hints: dict[str, list[str]] = field(default_factory=dict)
    """Source name -> what to change to read what was skipped (e.g. ``set text_field: content``)."""

    def summary(self) -> str:
        lines = []
        for name, counts in self.skipped.items():
            shown = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing"
            hints = "".join(f"; {h}" for h in self.hints.get(name, []))
            lines.append(f"source {name}: skipped {shown}{hints}")
        c = self.curation
        removed = ", ".join(f"{k}={v}" for k, v in sorted(c["removed"].items())) or "none"
        lines.append(
            f"curation: {c['seen']} documents seen, removed {removed}; "
            f"train {c['splits']['train']}, validation {c['splits']['validation']}"
        )
        if c.get("redactions"):
            lines.append("  redacted: " + ", ".join(f"{k}={v}" for k, v in sorted(c["redactions"].items())))
        return "\n".join(lines)


class TokenizedCorpus:
    """Curated, tokenized documents by (source, split), memory-mapped from the cache."""

    def __init__(self, dataset: Any, encoder: DocumentEncoder, report: CorpusReport, folder: Path) -> None:
        self.dataset = dataset
        self.encoder = encoder
        self.report = report
        self.folder = folder
        sources = np.asarray(dataset.data.column("source").to_numpy(zero_copy_only=False))
        splits = np.asarray(dataset.data.column("split").to_numpy(zero_copy_only=False))
        self._index: dict[tuple[str, str], np.ndarray] = {}
        for name in dict.fromkeys(sources.tolist()):
            for split in ("train", "validation"):
                self._index[(name, split)] = np.flatnonzero((sources == name) & (splits == split))
        lengths = np.asarray(dataset.data.column("n_tokens").to_numpy())
        self._tokens = {k: int(lengths[v].sum()) for k, v in self._index.items()}

    def tokens(self, source: str, split: Side) -> int:
        """Tokens of ``source`` in ``split`` (before objectives add sentinels)."""
        return self._tokens.get((source, split), 0)

    def documents(self, source: str, split: Side, repeat: int = 0) -> Iterator[PackDocument]:
        """The packer's documents of ``source`` in ``split``, in corpus order; ``repeat`` renumbers them."""
        indices = self._index.get((source, split))
        if indices is None or not len(indices):
            return
        base = repeat * REPEAT_STRIDE
        table = self.dataset.with_format("arrow")
        columns = ("doc_id", "text", "input_ids", "labels", "offsets")
        laid_out = "layout" in self.dataset.column_names
        for first in range(0, len(indices), 64):
            batch = table[indices[first : first + 64]]
            doc_ids, texts = batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()
            lists = {c: batch.column(c) for c in columns[2:]}
            layouts = batch.column("layout").to_pylist() if laid_out else [None] * batch.num_rows
            for k in range(batch.num_rows):
                encoded = {c: lists[c][k].values.to_numpy() for c in columns[2:]}
                yield self.encoder.pack_document(
                    source, doc_ids[k], base + first + k, texts[k], encoded, layouts[k]
                )

    @classmethod
    def build_or_load(
        cls,
        sources: Sequence[Any],
        curation: CurationConfig,
        split: Split,
        encoder: DocumentEncoder,
        key: str,
        root: Path,
        num_proc: int | None = None,
    ) -> TokenizedCorpus:
        """Load the corpus cached under ``key``, or read, curate and tokenize it (and cache it)."""
        import datasets

        folder = root / f"corpus-{key}"
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            _build(sources, curation, split, encoder, folder, num_proc)
        meta = json.loads(manifest.read_text())
        parts = [datasets.Dataset.from_file(str(folder / f)) for f in meta["files"]]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return cls(dataset, encoder, CorpusReport(**meta["report"]), folder)

    @property
    def skipped_file(self) -> Path | None:
        """The list of skipped files and records (``skipped.jsonl``) kept with the cached corpus."""
        path = self.folder / SKIPPED_FILE
        return path if path.is_file() else None


def curated_documents(
    sources: Sequence[Any], curation: CurationConfig, split: Split
) -> tuple[Iterator[Document], CurationReport]:
    """Every source's documents through one curation pass (lazy; the report fills in as it is consumed).

    Curation sees single files (dedup, decontamination and the split are per file); repository documents are
    joined afterwards (:meth:`DocumentEncoder.repository`)."""
    return Curator(curation, split).run(chain.from_iterable(s.documents() for s in sources))


def _write_documents(documents: Iterable[Document], path: Path, batch: int = 512) -> int:
    import pyarrow as pa

    schema = pa.schema(
        [
            ("source", pa.string()),
            ("split", pa.string()),
            ("doc_id", pa.string()),
            ("text", pa.large_string()),
            ("layout", pa.list_(pa.int32())),
        ]
    )
    written = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        buffer: dict[str, list[str]] = {name: [] for name in schema.names}

        def flush() -> None:
            writer.write_batch(
                pa.record_batch(
                    [pa.array(buffer[n], type=schema.field(n).type) for n in schema.names], schema=schema
                )
            )
            for values in buffer.values():
                values.clear()

        for doc in documents:
            buffer["source"].append(doc.source)
            buffer["split"].append(doc.meta["split"])
            buffer["doc_id"].append(str(doc.doc_id))
            buffer["text"].append(doc.text)
            buffer["layout"].append(list(doc.meta.get("layout") or []))
            written += 1
            if len(buffer["text"]) == batch:
                flush()
        if buffer["text"]:
            flush()
    return written


def _tokenize(batch: dict[str, list], encoder: DocumentEncoder) -> dict[str, list]:
    out = encoder.encode_batch(batch["source"], batch["text"], batch["layout"])
    out["n_tokens"] = [len(ids) for ids in out["input_ids"]]
    return out


def _build(
    sources: Sequence[Any],
    curation: CurationConfig,
    split: Split,
    encoder: DocumentEncoder,
    folder: Path,
    num_proc: int | None,
) -> None:
    import datasets

    with atomic_folder(folder) as tmp:
        documents, report = curated_documents(sources, curation, split)
        if encoder.repository is not None:
            documents = encoder.repository.run(documents)
        n = _write_documents(documents, tmp / "documents.arrow")
        reports = {s.name: getattr(s, "skipped", SkipReport()) for s in sources}
        skipped = {name: dict(r.counts) for name, r in reports.items()}
        hints = {name: list(r.hints) for name, r in reports.items() if r.hints}
        write_skipped(tmp / SKIPPED_FILE, reports)
        if n == 0:
            raise ValueError(
                "data: no documents left after curation; "
                + CorpusReport(skipped, asdict(report), hints).summary().replace("\n", "; ")
            )
        raw = datasets.Dataset.from_file(str(tmp / "documents.arrow"))
        seen = set(raw.unique("source"))
        for s in sources:
            if s.name not in seen:
                removed = report.removed_by_source.get(s.name, {})
                raise ValueError(
                    f"data.sources[{s.name}]: nothing left after curation (removed {removed or 'none'}); "
                    "check the source or relax data.curation"
                )
        features = datasets.Features(
            {
                **raw.features,
                "input_ids": datasets.List(datasets.Value("int32")),
                "labels": datasets.List(datasets.Value("int32")),
                "offsets": datasets.List(datasets.Value("int32")),
                "n_tokens": datasets.Value("int64"),
            }
        )
        workers = num_proc if num_proc and num_proc > 1 and n >= 2 * num_proc else None
        with _quiet_datasets():
            tokenized = raw.map(
                _tokenize,
                batched=True,
                batch_size=256,
                fn_kwargs={"encoder": encoder},
                num_proc=workers,
                features=features,
                cache_file_name=str(tmp / "tokens.arrow"),
                new_fingerprint=folder.name,
                desc="tokenizing",
            )
        files = [os.path.basename(f["filename"]) for f in tokenized.cache_files]
        del raw, tokenized
        (tmp / "documents.arrow").unlink()
        meta = {
            "files": files,
            "report": asdict(CorpusReport(skipped, asdict(report), hints)),
            "documents": n,
        }
        (tmp / "manifest.json").write_text(json.dumps(meta, indent=1))


SKIPPED_FILE = "skipped.jsonl"
"""Every file or record the sources skipped, one JSON object a line: ``source``, ``reason``, ``where``."""


def write_skipped(path: Path, reports: dict[str, SkipReport]) -> int:
    """Write the skipped locations of every source to ``path``; returns how many lines were written."""
    lines = [
        json.dumps({"source": name, "reason": reason, "where": where})
        for name, report in reports.items()
        for reason, where in report.listed
    ]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


class _quiet_datasets:
    """Silence ``datasets`` progress bars while the corpus is built (the summary says what happened)."""

    def __enter__(self) -> None:
        import datasets

        self._was = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        import datasets

        if not self._was:
            datasets.enable_progress_bars()


def stream_documents(
    source: Any,
    curator: Curator,
    encoder: DocumentEncoder,
    split: Side,
    shard: int = 0,
    num_shards: int = 1,
    repeat: int = 0,
) -> Iterator[PackDocument]:
    """Streaming: one source read lazily, curated on its own, and every ``num_shards``-th document encoded.

    Documents are numbered within the source's side of the split before sharding, so a document's FIM draw
    is the same on every rank and worker. Dedup here is within the source (a cross-source pass would have to
    see every source first).
    """
    documents, _ = curator.run(source.documents(), side=split)
    if encoder.repository is not None:
        documents = encoder.repository.run(documents)
    base = repeat * REPEAT_STRIDE
    for ordinal, doc in enumerate(documents):
        if ordinal % num_shards != shard:
            continue
        layout = doc.meta.get("layout") or []
        encoded = encoder.encode_batch([doc.source], [doc.text], [layout])
        one = {k: v[0] for k, v in encoded.items()}
        yield encoder.pack_document(doc.source, str(doc.doc_id), base + ordinal, doc.text, one, layout)


def default_objective(source: Any, fim_enabled: bool) -> Objective:
    """Chat for conversations, FIM for code trees when FIM is on, plain causal LM otherwise."""
    if isinstance(source, ChatFiles):
        return "chat"
    if isinstance(source, (CodeFiles, GitRepos)) and fim_enabled:
        return "fim"
    return "causal"


__all__ = [
    "REPEAT_STRIDE",
    "SKIPPED_FILE",
    "CorpusReport",
    "DocumentEncoder",
    "Objective",
    "TokenizedCorpus",
    "corpus_key",
    "curated_documents",
    "default_objective",
    "stream_documents",
    "tokenizer_fingerprint",
]
