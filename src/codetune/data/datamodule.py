"""The LightningDataModule recipes configure: sources -> curation -> tokenize -> objective -> pack -> batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from codetune.data.sources import CodeFiles
from codetune.model.tokens import TokenizerSpec, build_tokenizer

log = logging.getLogger(__name__)

# Row keys that become tensors; `documents` stays metadata for preview and metrics.
TENSOR_KEYS = ("input_ids", "labels", "position_ids", "token_kind", "source_index")


@dataclass
class Split:
    """Which documents are held out for validation."""

    val_fraction: float = 0.02
    """Fraction of documents (by stable hash of their id) held out; the same files on every run and machine."""
    max_val_rows: int | None = 64
    """Cap on validation rows, to keep evaluation quick."""


class CodeDataModule(L.LightningDataModule):
    """Packed fixed-length rows of code for causal LM training."""

    def __init__(
        self,
        tokenizer: TokenizerSpec,
        sources: list[CodeFiles],
        seq_len: int = 512,
        batch_size: int = 8,
        split: Split | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            tokenizer: The one tokenizer of the run; the model gets it from here.
            sources: Where documents come from.
            seq_len: Tokens per packed row.
            batch_size: Rows per batch on each device.
            split: Validation hold-out.
            num_workers: DataLoader worker processes.
            seed: Seed for shuffling and for objective transforms.
        """
        super().__init__()
        if seq_len < 8:
            raise ValueError(f"data.seq_len must be at least 8, got {seq_len}")
        if not sources:
            raise ValueError(
                "data.sources is empty: give at least one source (e.g. CodeFiles with path: '@stdlib')"
            )
        for source in sources:
            if not source.root.is_dir():
                raise FileNotFoundError(f"data.sources[{source.name}]: path {source.path} does not exist")
        self.tokenizer_spec = tokenizer
        self.sources = sources
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.split = split or Split()
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = build_tokenizer(tokenizer)
        self.train_rows: list[dict] | None = None
        self.val_rows: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        train_docs, val_docs = [], []
        for source in self.sources:
            n = 0
            for doc in source.documents():
                n += 1
                (val_docs if _held_out(doc.doc_id, self.split.val_fraction) else train_docs).append(doc)
            if n == 0:
                raise ValueError(f"data.sources[{source.name}]: no usable files ({source.skipped.summary()})")
            log.info("source %s: %d documents; skipped: %s", source.name, n, source.skipped.summary())
        self.train_rows = self._rows(train_docs)
        self.val_rows = self._rows(val_docs)[: self.split.max_val_rows]
        if not self.train_rows:
            raise ValueError(
                "data: no training rows after the validation split; add documents or lower val_fraction"
            )

    def _rows(self, docs) -> list[dict]:
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
        return _simple_pack([t + [eos] for t in ids], self.seq_len, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_rows,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=collate,
            num_workers=self.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_rows, batch_size=self.batch_size, collate_fn=collate, num_workers=self.num_workers
        )


def _held_out(doc_id: str, fraction: float) -> bool:
    import hashlib

    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def _simple_pack(docs: list[list[int]], seq_len: int, pad_id: int) -> list[dict]:
    rows, cur_ids, cur_pos, cur_lab = [], [], [], []
    for tokens in docs:
        for start in range(0, len(tokens), seq_len):
            piece = tokens[start : start + seq_len]
            while piece:
                room = seq_len - len(cur_ids)
                take, piece = piece[:room], piece[room:]
                labels = list(take)
                if cur_ids:
                    labels[0] = -100
                cur_ids += take
                cur_lab += labels
                cur_pos += list(range(len(take)))
                if len(cur_ids) == seq_len:
                    rows.append(
                        {
                            "input_ids": cur_ids,
                            "labels": cur_lab,
                            "position_ids": cur_pos,
                            "token_kind": [1] * seq_len,
                            "source_index": [0] * seq_len,
                        }
                    )
                    cur_ids, cur_pos, cur_lab = [], [], []
    return rows


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the tensor fields of packed rows; metadata (``documents``) is not sent to the model."""
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in TENSOR_KEYS if k in rows[0]}
