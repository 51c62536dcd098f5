"""Pack documents into fixed-length rows so that nothing leaks between them, the same way on every run.

Rows are filled greedily in stream order: several documents per row, a document that does not fit is cut
and continues in the next row (never dropped, never reordered), so padding appears only when the stream
ends (and where a repository document drawn for FIM would be cut: it starts the next row instead, so
repository-level FIM is not lost to where documents land). Leaks are closed by three rules:

* ``position_ids`` restart at 0 for every document span; transformers turns that into a block-diagonal
  attention mask (only when no KV cache is created: forward with ``use_cache=False``), so no token attends
  across spans;
* the first token of every span has label -100, so no document is trained to predict another's first token;
* labels given by the caller (chat masking) are carried through unchanged.

FIM (see :mod:`codetune.data.fim`) is applied here because whether a document is cut depends on where it
lands. At ``document`` level a document is transformed only if it fits the row whole, as in Code Llama; at
``context`` level each fragment that fits a row is transformed on its own (Bavarian et al. §3.2), fragments
are cut between characters so their text round-trips, and whatever the sentinels push past the row end
stays in the stream for the next row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codetune.data.batch import IGNORE_INDEX, TokenKind, real_tokens
from codetune.data.fim import FIMDraw, FIMEncoded, FIMTransform

_FIT_ATTEMPTS = 6
_FIM_OVERHEAD = 8
"""Room a FIM layout may need beyond the causal ids: four sentinels and a token or two per cut point."""


@dataclass
class PackDocument:
    """One document entering the packer."""

    source: str
    """Name of the source it came from; must be one of the packer's ``sources``."""
    doc_id: str | int
    """Identifier reported in the row's ``documents`` (path, dataset index, ...)."""
    ordinal: int
    """Position of the document within its source; with ``source`` it keys the FIM draw."""
    input_ids: list[int]
    """Causal token ids (with a BOS where the tokenizer adds one; the end-of-text is added if missing)."""
    labels: list[int] | None = None
    """Per-token labels (-100 = no loss), e.g. from chat masking; ``None`` = train on every token.
    Documents with labels are never FIM-transformed."""
    text: str | None = None
    """Source text; required for FIM. ``None``: the document is packed as given."""
    offsets: list[tuple[int, int]] | None = None
    """Character span of each input id in ``text``; required for context-level FIM, which cuts between
    characters."""
    layout: list[int] | None = None
    """A repository document's pieces (:mod:`codetune.data.repository`): FIM then transforms one of its files
    and keeps the others as context."""


@dataclass
class RowSummary:
    """Counts over a set of rows: real tokens, tokens and spans per source, FIM layouts per source."""

    rows: int = 0
    tokens: int = 0
    real_tokens: int = 0
    source_tokens: dict[str, int] = field(default_factory=dict)
    spans: dict[str, int] = field(default_factory=dict)
    psm: dict[str, int] = field(default_factory=dict)
    spm: dict[str, int] = field(default_factory=dict)

    def add(self, row: dict[str, Any], source_names: Sequence[str]) -> None:
        kinds = np.asarray(row["token_kind"])
        index = np.asarray(row["source_index"])
        self.rows += 1
        self.tokens += len(kinds)
        self.real_tokens += int(real_tokens(row).sum())
        counts = np.bincount(index[index >= 0], minlength=len(source_names))
        for i, name in enumerate(source_names):
            if counts[i]:
                self.source_tokens[name] = self.source_tokens.get(name, 0) + int(counts[i])
        for span in row["documents"]:
            name = span["source"]
            self.spans[name] = self.spans.get(name, 0) + 1
            if span["fim"] in ("psm", "spm"):
                target = self.psm if span["fim"] == "psm" else self.spm
                target[name] = target.get(name, 0) + 1

    @property
    def span_count(self) -> int:
        return sum(self.spans.values())

    @property
    def fim_psm(self) -> int:
        return sum(self.psm.values())

    @property
    def fim_spm(self) -> int:
        return sum(self.spm.values())

    @property
    def real_fraction(self) -> float:
        return self.real_tokens / self.tokens if self.tokens else 1.0

    def shares(self) -> dict[str, float]:
        total = sum(self.source_tokens.values())
        return {n: t / total for n, t in self.source_tokens.items()} if total else {}

    def fim_rates(self, fim_sources: Iterable[str]) -> tuple[float, float, float] | None:
        """(FIM, PSM, SPM) rates over the spans of FIM sources: FIM spans / spans, PSM and SPM / spans."""
        names = list(fim_sources)
        spans = sum(self.spans.get(n, 0) for n in names)
        if not spans:
            return None
        psm = sum(self.psm.get(n, 0) for n in names)
        spm = sum(self.spm.get(n, 0) for n in names)
        return (psm + spm) / spans, psm / spans, spm / spans

    def lines(self, objectives: dict[str, str]) -> list[str]:
        """The human-readable summary."""
        out = [
            f"rows: {self.rows:,}, real-token fraction {self.real_fraction:.4f} ({self.real_tokens:,} of {self.tokens:,})"
        ]
        shares = self.shares()
        if shares:
            out.append("token shares: " + ", ".join(f"{n} {s:.4f}" for n, s in shares.items()))
        rates = self.fim_rates(n for n, o in objectives.items() if o == "fim")
        if rates is not None:
            out.append(f"FIM spans: {rates[0]:.3f} of code spans (PSM {rates[1]:.3f}, SPM {rates[2]:.3f})")
        return out


@dataclass
class _Cursor:
    """The part of the current document not yet placed in a row."""

    doc: PackDocument
    ids: list[int]
    """Causal ids, ending with end-of-text."""
    labels: list[int] | None
    """``None``: the labels are the ids."""
    fim: bool
    starts: list[int] | None = None
    """Context level: character where token ``k`` starts; ``starts[len(ids) - 1] = len(text)`` (the eos)."""
    clean: list[bool] | None = None
    """Context level: ``clean[k]`` = a cut before token ``k`` falls between characters."""
    pos: int = 0
    chunk: int = 0


class _Row:
    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.input_ids: list[int] = []
        self.labels: list[int] = []
        self.position_ids: list[int] = []
        self.token_kind: list[int] = []
        self.source_index: list[int] = []
        self.documents: list[dict[str, Any]] = []
        self.closed = False

    @property
    def space(self) -> int:
        return 0 if self.closed else self.seq_len - len(self.input_ids)

    def add(
        self,
        ids: Sequence[int],
        labels: Sequence[int],
        kinds: Sequence[int],
        source: int,
        meta: dict[str, Any],
    ) -> None:
        start = len(self.input_ids)
        self.input_ids.extend(ids)
        self.labels.append(IGNORE_INDEX)  # no span is trained to predict its first token from another span
        self.labels.extend(labels[1:])
        self.position_ids.extend(range(len(ids)))
        self.token_kind.extend(kinds)
        self.source_index.extend([source] * len(ids))
        self.documents.append({**meta, "start": start, "end": len(self.input_ids)})

    def finish(self, pad_id: int) -> dict[str, Any]:
        n = self.seq_len - len(self.input_ids)
        # Padding is its own block (positions from 0) so it never joins the last document's attention.
        return {
            "input_ids": self.input_ids + [pad_id] * n,
            "labels": self.labels + [IGNORE_INDEX] * n,
            "position_ids": self.position_ids + list(range(n)),
            "token_kind": self.token_kind + [int(TokenKind.PAD)] * n,
            "source_index": self.source_index + [-1] * n,
            "documents": self.documents,
        }


class Packer:
    """Streams :class:`PackDocument` objects into rows of ``seq_len`` tokens (resuming is the loader's job: it
    restarts the stream and skips the batches already trained on).

    Each row is a dict of equal-length lists ``input_ids``, ``labels``, ``position_ids``, ``token_kind``,
    ``source_index`` (index into ``sources``, -1 for padding), plus ``documents``: one
    ``{source, doc_id, chunk, start, end, fim}`` per span, ``[start, end)`` in the row.
    """

    def __init__(
        self,
        seq_len: int,
        eos_id: int,
        pad_id: int,
        sources: Sequence[str],
        fim: FIMTransform | None = None,
    ) -> None:
        if seq_len < 8:
            raise ValueError(f"packing seq_len must be at least 8 tokens, got {seq_len}")
        if len(set(sources)) != len(sources) or not sources:
            raise ValueError(f"packer sources must be distinct, non-empty names, got {list(sources)}")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.sources = list(sources)
        self._source_index = {name: i for i, name in enumerate(self.sources)}
        self.fim = fim
        self._fim_on = fim is not None and fim.config.fim_rate > 0
        self._context_level = self._fim_on and fim.config.level == "context"
        self._cursor: _Cursor | None = None
        self.stats = RowSummary()
        self.documents = 0
        self.repository_rows_closed = 0
        """Rows ended early so that a repository document drawn for FIM starts the next row whole."""
        self.fim_left_causal = 0
        """Draws that asked for FIM but were left causal because the document (fragment) did not fit a row."""

    # -- streaming ------------------------------------------------------------------------------------------

    def pack(self, documents: Iterable[PackDocument]) -> Iterator[dict[str, Any]]:
        """Yield rows; the stream ends with one padded row holding whatever is left."""
        it = iter(documents)
        row = _Row(self.seq_len)
        while True:
            if self._cursor is None:
                doc = next(it, None)
                if doc is None:
                    break
                self.documents += 1
                self._cursor = self._start(doc)
            if self._context_level and self._cursor.fim:
                self._place_context_level(self._cursor, row)
            else:
                self._place_document_level(self._cursor, row)
            if self._cursor.pos >= len(self._cursor.ids):
                self._cursor = None
            if row.space == 0:
                yield self._emit(row)
                row = _Row(self.seq_len)
        if row.input_ids:
            yield self._emit(row)

    def _emit(self, row: _Row) -> dict[str, Any]:
        finished = row.finish(self.pad_id)
        self.stats.add(finished, self.sources)
        return finished

    def _start(self, doc: PackDocument) -> _Cursor:
        """Check a document and normalise it to causal ids ending in end-of-text."""
        if doc.source not in self._source_index:
            raise ValueError(
                f"document {doc.doc_id!r} comes from source {doc.source!r}, which the packer does not know; "
                f"its sources are {self.sources}"
            )
        fim = self._fim_on and doc.text is not None and doc.labels is None
        ids = list(doc.input_ids)
        if doc.labels is not None and len(doc.labels) != len(ids):
            raise ValueError(
                f"document {doc.doc_id!r} ({doc.source}): {len(doc.labels)} labels for {len(ids)} input_ids"
            )
        labels = None if doc.labels is None else list(doc.labels)
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
            if labels is not None:  # end-of-text is trained only where the text before it is
                labels.append(self.eos_id if labels and labels[-1] != IGNORE_INDEX else IGNORE_INDEX)
        cursor = _Cursor(doc=doc, ids=ids, labels=labels, fim=fim)
        if fim and self._context_level:
            self._index_characters(cursor, doc.offsets)
        return cursor

    def _index_characters(self, cur: _Cursor, offsets: Sequence[tuple[int, int]] | None) -> None:
        """Map tokens to characters so context-level fragments are cut between characters."""
        assert self.fim is not None and cur.doc.text is not None
        n_text = len(cur.ids) - 1
        if offsets is None:
            raise ValueError(
                f"document {cur.doc.doc_id!r} ({cur.doc.source}): context-level FIM needs each token's character "
                "offsets (encode it with offsets, as the data module does)"
            )
        if len(offsets) not in (n_text, n_text + 1):
            raise ValueError(
                f"document {cur.doc.doc_id!r} ({cur.doc.source}): {len(offsets)} offsets for {n_text} tokens"
            )
        end = len(cur.doc.text)
        # Token k's text starts where token k-1's started if they share a character (a multi-byte character
        # split over byte-level tokens); a cut there would split the character, so it is not clean.
        starts = [0] + [offsets[k][0] for k in range(1, n_text)] + [end]
        starts[n_text] = end
        clean = [True] * (n_text + 1)
        for k in range(1, n_text):
            clean[k] = offsets[k - 1][1] <= offsets[k][0]
        cur.starts, cur.clean = starts, clean

    # -- placement ------------------------------------------------------------------------------------------

    def _meta(self, cur: _Cursor, fim: str | None) -> dict[str, Any]:
        return {"source": cur.doc.source, "doc_id": cur.doc.doc_id, "chunk": cur.chunk, "fim": fim}

    def _add_causal(self, cur: _Cursor, end: int, row: _Row) -> None:
        ids = cur.ids[cur.pos : end]
        labels = ids if cur.labels is None else cur.labels[cur.pos : end]
        row.add(
            ids,
            labels,
            [int(TokenKind.PLAIN)] * len(ids),
            self._source_index[cur.doc.source],
            self._meta(cur, None),
        )
        cur.pos = end
        cur.chunk += 1

    def _add_fim(self, cur: _Cursor, enc: FIMEncoded, end: int, row: _Row) -> None:
        middle, context = int(TokenKind.FIM_MIDDLE), int(TokenKind.FIM_CONTEXT)  # plain ints: rows go to JSON
        kinds = [middle if m else context for m in enc.middle_mask]
        row.add(
            enc.input_ids, enc.input_ids, kinds, self._source_index[cur.doc.source], self._meta(cur, enc.mode)
        )
        cur.pos = end
        cur.chunk += 1

    def _encode_fim(self, text: str, d: FIMDraw, final: bool, doc: PackDocument | None = None) -> FIMEncoded:
        assert self.fim is not None
        if doc is not None and doc.layout:
            enc = self.fim.encode_repository(text, doc.layout, d, doc.source, doc.ordinal)
        else:
            enc = self.fim.encode_split(self.fim.split(text, d))
        if final and enc.input_ids[-1] != self.eos_id:  # StarCoder's end sentinel is end-of-text already
            enc.input_ids.append(self.eos_id)
            enc.middle_mask.append(False)
        return enc

    def _place_document_level(self, cur: _Cursor, row: _Row) -> None:
        """Place a whole document if it fits, FIM-transformed if drawn and the transformed one fits too."""
        space = row.space
        if (
            cur.doc.layout
            and cur.fim
            and cur.pos == 0
            and space < len(cur.ids) <= self.seq_len - _FIM_OVERHEAD
            and row.input_ids
            and self.fim.draw(cur.doc.source, cur.doc.ordinal).mode is not None
        ):
            # A repository document is sized to a row (RepositoryAssembler), so it rarely fits the rest of one:
            # drawn for FIM, it starts the next row instead of being cut, and the rest of this row is padding.
            row.closed = True
            self.repository_rows_closed += 1
            return
        if cur.fim and cur.pos == 0 and len(cur.ids) <= space:
            assert self.fim is not None and cur.doc.text is not None
            d = self.fim.draw(cur.doc.source, cur.doc.ordinal)
            if d.mode is not None:
                enc = self._encode_fim(cur.doc.text, d, final=True, doc=cur.doc)
                if len(enc.input_ids) <= space:
                    self._add_fim(cur, enc, len(cur.ids), row)
                    return
                self.fim_left_causal += 1
        elif cur.fim and cur.pos == 0 and self.fim.draw(cur.doc.source, cur.doc.ordinal).mode is not None:
            self.fim_left_causal += 1  # cut across rows: stays causal, as in Code Llama
        self._add_causal(cur, min(len(cur.ids), cur.pos + space), row)

    def _snap(self, cur: _Cursor, k: int) -> int:
        """The last clean cut at or before token ``k`` (``cur.pos`` if there is none)."""
        assert cur.clean is not None
        while k > cur.pos and not cur.clean[k]:
            k -= 1
        return k

    def _place_context_level(self, cur: _Cursor, row: _Row) -> None:
        """Place the next fragment of a document: as much as fits, FIM-transformed if its draw says so."""
        assert self.fim is not None and cur.starts is not None
        space, n = row.space, len(cur.ids)
        d = self.fim.draw(cur.doc.source, cur.doc.ordinal, cur.chunk)
        if d.mode is not None:
            placed = self._fit_fim_fragment(cur, d, space)
            if placed is not None:
                self._add_fim(cur, *placed, row)
                if cur.pos < n:
                    # Cut mid-document: the document goes on in the next row. The slot or two that
                    # re-tokenization left free are padded rather than spent on a fragment too short to learn from.
                    row.closed = True
                return
            self.fim_left_causal += 1
        end = n if n - cur.pos <= space else self._snap(cur, cur.pos + space)
        if end <= cur.pos:  # no character boundary within the few free slots: pad them
            row.closed = True
            return
        self._add_causal(cur, end, row)

    def _fit_fim_fragment(self, cur: _Cursor, d: FIMDraw, space: int) -> tuple[FIMEncoded, int] | None:
        """The longest fragment from ``cur.pos`` whose FIM encoding fits ``space``, and the token it ends at.

        Re-tokenizing the parts changes the length by a few tokens, so the fragment is sized from the causal
        length minus the sentinels, then shrunk by any overflow and grown into any slack. Text that does not
        fit stays in the stream for the next fragment: the sentinels never push data out.
        """
        assert self.fim is not None and cur.starts is not None and cur.doc.text is not None
        n_text = len(cur.ids) - 1
        overhead = 4 + (self.fim.bos_id is not None) + 2  # sentinels, BOS, ~1 extra token per cut point
        end = min(n_text, cur.pos + space - overhead)
        best: tuple[FIMEncoded, int] | None = None
        tried: set[int] = set()
        for _ in range(_FIT_ATTEMPTS):
            if end < n_text:
                end = self._snap(cur, end)
            if end <= cur.pos or end in tried or (best is not None and end <= best[1]):
                break
            tried.add(end)
            final = end == n_text
            fragment = cur.doc.text[cur.starts[cur.pos] : cur.starts[end]]
            if not fragment:
                break
            enc = self._encode_fim(fragment, d, final)
            slack = space - len(enc.input_ids)
            if slack >= 0:
                best = (enc, len(cur.ids) if final else end)
                if slack == 0 or final:
                    break
                end = min(n_text, end + slack)
            else:
                end += slack
        return best


__all__ = ["PackDocument", "Packer", "RowSummary"]
