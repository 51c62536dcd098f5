"""Training rows: each source packed with its own objective, rows mixed by token share, stored memory-mapped.

:class:`RowBuilder` turns per-source document streams into one stream of rows (a :class:`Packer` per source and
pass, FIM only for ``fim`` sources, a :class:`RowMixer` across sources). :class:`RowStore` keeps the rows of a
map-style run on disk as one ``np.memmap`` per tensor field plus the span metadata as JSON lines, so a second run
with the same settings neither tokenizes nor packs, and workers open the arrays without copying them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from codetune.data.batch import BATCH_FIELDS
from codetune.data.corpus import Objective
from codetune.data.fim import FIMTransform
from codetune.data.mixing import RowMixer, Stop
from codetune.data.packing import PackDocument, Packer, RowSummary
from codetune.storage import atomic_folder

ROWS_FORMAT = 1


class RowBuilder:
    """Packs each source with its own objective and mixes the rows (see the module docstring)."""

    def __init__(
        self,
        seq_len: int,
        eos_id: int,
        pad_id: int,
        source_names: Sequence[str],
        objectives: dict[str, Objective],
        fim: FIMTransform | None,
        weights: dict[str, float],
        stop: Stop = "first_exhausted",
        num_tokens: int | None = None,
    ) -> None:
        self.seq_len, self.eos_id, self.pad_id = seq_len, eos_id, pad_id
        self.source_names = list(source_names)
        self.objectives = objectives
        self.fim = fim
        self.mixer = RowMixer(weights, stop, num_tokens)
        self.packers: list[Packer] = []

    def rows(self, open_documents: Callable[[str, int], Iterator[PackDocument]]) -> Iterator[dict[str, Any]]:
        """Mixed rows; ``open_documents(name, k)`` gives the documents of pass ``k`` over source ``name``."""

        def open_pass(name: str, k: int) -> Iterator[dict[str, Any]]:
            fim = self.fim if self.objectives[name] == "fim" else None
            packer = Packer(self.seq_len, self.eos_id, self.pad_id, self.source_names, fim=fim)
            self.packers.append(packer)
            return packer.pack(open_documents(name, k))

        return self.mixer.mix(open_pass)

    @property
    def packing(self) -> dict[str, int]:
        """What packing alone knows, summed over every packer used so far: documents read, and FIM draws left
        causal because the document did not fit a row (the rows themselves are counted by ``RowSummary``)."""
        return {
            "documents": sum(p.documents for p in self.packers),
            "fim_left_causal": sum(p.fim_left_causal for p in self.packers),
        }


class RowStore:
    """Packed rows on disk (see the module docstring); picklable, it reopens its arrays in each process."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.meta: dict[str, Any] = json.loads((self.folder / "meta.json").read_text())
        self.n_rows: int = self.meta["rows"]
        self.seq_len: int = self.meta["seq_len"]
        self.source_names: list[str] = self.meta["source_names"]
        self._arrays: dict[str, np.ndarray] | None = None
        self._doc_offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n_rows

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None, "_doc_offsets": None}

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            shape = (self.n_rows, self.seq_len)
            self._arrays = (
                {
                    name: np.memmap(self.folder / f"{name}.bin", dtype=dtype, mode="r", shape=shape)
                    for name, dtype in BATCH_FIELDS.items()
                }
                if self.n_rows
                else {name: np.zeros((0, self.seq_len), dtype) for name, dtype in BATCH_FIELDS.items()}
            )
        return self._arrays

    def row(self, i: int, documents: bool = False) -> dict[str, Any]:
        """Row ``i`` as arrays (int64, ready for torch), with its span metadata if asked."""
        arrays = self._open()
        out: dict[str, Any] = {name: np.asarray(a[i], dtype=np.int64) for name, a in arrays.items()}
        if documents:
            out["documents"] = self.documents(i)
        return out

    def documents(self, i: int) -> list[dict[str, Any]]:
        """The spans of row ``i``: ``{source, doc_id, chunk, start, end, fim}``."""
        if self._doc_offsets is None:
            self._doc_offsets = np.fromfile(self.folder / "documents.idx", dtype=np.int64)
        start, end = self._doc_offsets[i], self._doc_offsets[i + 1]
        with open(self.folder / "documents.jsonl", "rb") as handle:
            handle.seek(int(start))
            return json.loads(handle.read(int(end - start)))

    @property
    def summary(self) -> RowSummary:
        return RowSummary(**self.meta["summary"])

    @classmethod
    def write(
        cls,
        folder: Path,
        rows: Iterable[dict[str, Any]],
        seq_len: int,
        source_names: Sequence[str],
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> RowStore:
        """Write ``rows`` under ``folder`` atomically (a temporary folder renamed into place)."""
        summary = RowSummary()
        with atomic_folder(folder) as tmp:
            files = {name: open(tmp / f"{name}.bin", "wb") for name in BATCH_FIELDS}
            offsets = [0]
            n = 0
            with open(tmp / "documents.jsonl", "wb") as docs:
                for row in rows:
                    for name, dtype in BATCH_FIELDS.items():
                        values = np.asarray(row[name], dtype=dtype)
                        if values.shape != (seq_len,):
                            raise ValueError(
                                f"row {n} field {name} has shape {values.shape}, not ({seq_len},)"
                            )
                        files[name].write(values.tobytes())
                    line = (json.dumps(row["documents"], separators=(",", ":")) + "\n").encode()
                    docs.write(line)
                    offsets.append(offsets[-1] + len(line))
                    summary.add(row, source_names)
                    n += 1
            for handle in files.values():
                handle.close()
            np.asarray(offsets, dtype=np.int64).tofile(tmp / "documents.idx")
            meta = {
                "format": ROWS_FORMAT,
                "rows": n,
                "seq_len": seq_len,
                "source_names": list(source_names),
                "summary": asdict(summary),
                **(extra() if extra else {}),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        return cls(folder)


__all__ = ["RowBuilder", "RowStore", "RowSummary"]
