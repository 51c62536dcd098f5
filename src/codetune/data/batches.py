"""Batches for one rank that resume exactly: the train loader's position is saved in Lightning checkpoints.

Every batch carries its position ``(epoch, batches done)``. :class:`ResumableLoader` is a ``DataLoader`` with
``state_dict`` / ``load_state_dict``, which Lightning 2.6 saves in the checkpoint (``FitLoop`` collects the
state of every stateful train loader) and restores before the loader's next ``iter()``. The position saved is
that of the last batch the *trainer consumed* (the data module pops it in ``on_before_batch_transfer``), not
the last one fetched: Lightning prefetches a batch when the length is unknown, and workers run ahead.

Map-style (:class:`PackedBatches`): the rows are known, so epoch ``e`` is a permutation drawn from
``(seed, e)``; the first ``len // (world * batch) * world * batch`` rows of it are dealt to ranks round-robin,
so ranks get disjoint rows and the same number of batches. Resuming at batch ``b`` starts at row ``b * batch``.

Streaming (:class:`StreamingBatches`): documents are dealt to ``world * workers`` shards (each rank and worker
its own, disjoint), each shard packs and mixes its own rows forever (passes repeat with fresh FIM draws; end a
run with ``trainer.max_steps``). PyTorch's loader takes batches from its workers round-robin, so batch ``i`` of
a rank comes from lane ``i % workers``; resuming at batch ``k`` replays each lane's stream and drops the batches
it had delivered, with worker ``j`` taking lane ``(k + j) % workers`` so the order continues unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from codetune.data.batch import BATCH_FIELDS
from codetune.data.rows import RowStore

POSITION_KEY = "_position"
"""Batch key carrying ``(epoch, batches done)``; removed before the batch reaches the model."""
LOADER_FORMAT = 1

Position = tuple[int, int]
Rows = list[dict[str, Any]]


def collate(rows: Rows) -> dict[str, torch.Tensor]:
    """Stack the tensor fields of packed rows; metadata (``documents``) is not sent to the model."""
    return {
        k: torch.from_numpy(np.stack([np.asarray(r[k], dtype=np.int64) for r in rows]))
        for k in BATCH_FIELDS
        if k in rows[0]
    }


def collate_positioned(item: tuple[Rows, Position]) -> dict[str, Any]:
    """A train batch: the tensors plus its position (a plain tuple, so Lightning's transfers leave it alone)."""
    rows, position = item
    return {**collate(rows), POSITION_KEY: tuple(position)}


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class PackedBatches(IterableDataset):
    """A rank's batches over stored rows, reshuffled every epoch (see the module docstring)."""

    def __init__(
        self, store: RowStore, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.store = store
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.num_batches = len(store) // (world_size * batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"data: {len(store)} training rows cannot fill one batch of {batch_size} on each of {world_size} "
                "ranks; lower data.batch_size or data.seq_len, or add documents"
            )
        self.start: Position = (0, 0)
        self.consumed: Position = (0, 0)
        self.fingerprint = store.folder.name

    def __len__(self) -> int:
        return self.num_batches

    def rank_rows(self, epoch: int) -> np.ndarray:
        """Row indices this rank reads in ``epoch``, in order."""
        n = len(self.store)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        usable = self.num_batches * self.batch_size * self.world_size
        return order[:usable][self.rank :: self.world_size]

    def batches(
        self, start: Position, worker: int = 0, num_workers: int = 1, documents: bool = False
    ) -> Iterator[tuple[Rows, Position]]:
        """Batches from ``start`` on; worker ``j`` of ``n`` yields every ``n``-th, starting with the ``j``-th."""
        epoch, done = start
        rows = self.rank_rows(epoch)
        b = self.batch_size
        for i in range(done + worker, self.num_batches, num_workers):
            yield [self.store.row(int(r), documents) for r in rows[i * b : (i + 1) * b]], (epoch, i + 1)

    def __iter__(self) -> Iterator[tuple[Rows, Position]]:
        return self.batches(self.start, *_worker())

    def normalise(self, position: Position) -> Position:
        """A position at the end of an epoch is the start of the next."""
        epoch, done = position
        return (epoch + 1, 0) if done >= self.num_batches else (epoch, done)

    def describe(self) -> dict[str, Any]:
        return {"mode": "packed", "rows": self.fingerprint, "shuffle": self.shuffle, "seed": self.seed}


class StreamingBatches(IterableDataset):
    """A rank's endless stream of batches from its document shards (see the module docstring)."""

    def __init__(
        self,
        make_rows: Callable[[int, int], Iterator[dict[str, Any]]],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        fingerprint: str = "",
    ) -> None:
        self.make_rows = make_rows
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.lanes = max(1, num_workers)
        self.start: Position = (0, 0)
        self.consumed: Position = (0, 0)
        self.fingerprint = fingerprint

    def batches(
        self, start: Position, worker: int = 0, num_workers: int = 1, documents: bool = True
    ) -> Iterator[tuple[Rows, Position]]:
        if num_workers != self.lanes:
            raise ValueError(
                f"streaming batches were set up for {self.lanes} loader workers but run with {num_workers}"
            )
        done = start[1]
        lane = (done + worker) % self.lanes
        skip = max(0, -(-(done - lane) // self.lanes))  # batches this lane delivered before `done`
        rows = self.make_rows(self.rank * self.lanes + lane, self.world_size * self.lanes)
        k = 0
        while True:
            batch = list(islice(rows, self.batch_size))
            if len(batch) < self.batch_size:
                return  # only a finite test stream ends
            if k >= skip:
                yield batch, (0, lane + k * self.lanes + 1)
            k += 1

    def __iter__(self) -> Iterator[tuple[Rows, Position]]:
        return self.batches(self.start, *_worker())

    def normalise(self, position: Position) -> Position:
        return position

    def describe(self) -> dict[str, Any]:
        return {"mode": "streaming", "rows": self.fingerprint, "lanes": self.lanes}


class ResumableLoader(DataLoader):
    """The train ``DataLoader``: batches from :class:`PackedBatches` or :class:`StreamingBatches`, stateful.

    ``track_consumed``: the position is set by the data module's batch hook (inside a Trainer); otherwise by
    this loader as it yields (plain iteration, where fetched is consumed).
    """

    def __init__(
        self,
        dataset: PackedBatches | StreamingBatches,
        num_workers: int = 0,
        track_consumed: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("batch_size", None)
        kwargs.pop("collate_fn", None)
        # Its own generator: each epoch's iterator draws a worker seed, which must not come from (and shift) the
        # global torch RNG that dropout uses, or a resume from an epoch-end checkpoint would diverge.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=collate_positioned, **kwargs
        )
        self.track_consumed = track_consumed
        self._resume: Position | None = None
        self._epoch: int | None = None

    def _next_start(self) -> Position:
        if self._resume is not None:
            start, self._resume = self._resume, None
        elif self._epoch is None:
            start = (0, 0)
        else:
            start = (self._epoch + 1, 0)
        return self.dataset.normalise(start)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = self._next_start()
        self.dataset.start = start  # read by the workers, which are created below with a copy of the dataset
        self.dataset.consumed = start
        self._epoch = start[0]
        for batch in super().__iter__():
            if not self.track_consumed:
                self.dataset.consumed = batch.pop(POSITION_KEY)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        epoch, done = self.dataset.consumed
        return {
            "format": LOADER_FORMAT,
            "epoch": int(epoch),
            "batches": int(done),
            "batch_size": self.dataset.batch_size,
            "world_size": self.dataset.world_size,
            **self.dataset.describe(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != LOADER_FORMAT:
            raise ValueError(
                f"data loader state format {state.get('format')!r} is not {LOADER_FORMAT}; cannot resume"
            )
        expected = {
            "batch_size": self.dataset.batch_size,
            "world_size": self.dataset.world_size,
            **self.dataset.describe(),
        }
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume the data position: the data settings changed since the checkpoint ({what}); "
                "resume with the same data, batch size, devices and workers"
            )
        self._resume = (int(state["epoch"]), int(state["batches"]))
        self.dataset.consumed = self._resume


__all__ = [
    "POSITION_KEY",
    "PackedBatches",
    "ResumableLoader",
    "StreamingBatches",
    "collate",
    "collate_positioned",
]
