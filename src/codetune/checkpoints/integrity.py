"""Whether a checkpoint is what was written: a checksum of every tensor, stored inside it and verified on load.

A checkpoint that was cut off (a kill, a full disk) no longer unpickles, which the readers report; one whose bytes
changed after it was written (a bad disk, a copy gone wrong, a bit flip) unpickles fine and would train on, or
export, garbage. So every checkpoint ``codetune fit`` writes carries :data:`CHECKSUM_KEY`: per tensor (weights,
optimizer states, RNG states) its dtype, shape and the sum modulo 2**64 of its bytes read as 64-bit words. The sum
is computed where the tensor lives (on the GPU during a save, memory-mapped on the CPU during a load) at memory
speed; integer addition wraps the same in any order, so both agree bit for bit. It detects every single-bit error
and, all but certainly, any larger change; it is not a cryptographic hash (it is meant against corruption, not
tampering). (A SHA-256 of the bytes would run at about a twentieth of the speed, and on the CPU only.)

Sharded (FSDP2) checkpoint folders hold DTensors, which are not summed: they are left to
``torch.distributed.checkpoint``, which reads every shard whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKSUM_KEY = "codetune_checksums"
"""Checkpoint key of the tensor checksums: ``{"algorithm": ..., "tensors": {path: [dtype, shape, sum]}}``."""
ALGORITHM = "sum64-words/1"
_MASK = (1 << 64) - 1
_verified: set[tuple[str, int, int]] = set()


class CorruptCheckpoint(ValueError):
    """A checkpoint whose tensors are not what was written."""


class NonFiniteError(ValueError):
    """The loss or the weights became NaN or infinite: training stops, and nothing of it is saved."""


def tensor_checksum(tensor: torch.Tensor) -> int:
    """The sum modulo 2**64 of ``tensor``'s bytes read as 64-bit words (zero-padded), as a Python int."""
    flat = tensor.detach()
    if flat.layout != torch.strided:
        flat = flat.to_dense()
    flat = flat.contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    raw = flat.view(torch.uint8)
    if raw.numel() % 8:
        raw = torch.cat([raw, raw.new_zeros(8 - raw.numel() % 8)])
    # int64 sums wrap (two's complement) on CPU and CUDA alike; an int32 view summed into int64 is 40x slower.
    return int(raw.view(torch.int64).sum()) & _MASK


def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != CHECKSUM_KEY:
                yield from _tensors(item, f"{path}/{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}/{i}")


def _summable(tensor: torch.Tensor) -> bool:
    # DTensors (FSDP2 shards) sum to a collective, and meta tensors have no bytes.
    return type(tensor).__name__ != "DTensor" and tensor.device.type != "meta"


def add_checksums(checkpoint: dict[str, Any]) -> None:
    """Record the checksum of every tensor of ``checkpoint`` (a dict being saved) in it."""
    checkpoint[CHECKSUM_KEY] = {
        "algorithm": ALGORITHM,
        "tensors": {
            path: [str(t.dtype), list(t.shape), tensor_checksum(t)]
            for path, t in _tensors(checkpoint)
            if _summable(t)
        },
    }


def verify_checksums(checkpoint: dict[str, Any], where: str | Path) -> int:
    """Raise :class:`CorruptCheckpoint` naming the first tensor of ``checkpoint`` (a loaded dict) whose checksum
    differs from the one written; returns how many tensors were checked (0: written without checksums)."""
    recorded = checkpoint.get(CHECKSUM_KEY)
    if not isinstance(recorded, dict) or recorded.get("algorithm") != ALGORITHM:
        if recorded is not None:
            log.warning(
                "%s: checksums of an unknown kind (%s); not verified", where, recorded.get("algorithm")
            )
        return 0
    expected = recorded["tensors"]
    bad: list[str] = []
    checked = 0
    for path, tensor in _tensors(checkpoint):
        if path not in expected or not _summable(tensor):
            continue
        dtype, shape, total = expected[path]
        checked += 1
        if (
            str(tensor.dtype) != dtype
            or list(tensor.shape) != list(shape)
            or tensor_checksum(tensor) != total
        ):
            bad.append(path)
    if bad:
        raise CorruptCheckpoint(
            f"{where}: corrupted — {len(bad)} of {checked} tensors differ from what was written "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); do not resume from or export it: use an "
            "earlier checkpoint of the run, or retrain"
        )
    return checked


def file_key(path: str | Path) -> tuple[str, int, int] | None:
    """What identifies one written version of a checkpoint file (a rewrite changes size or mtime)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


def mark_verified(path: str | Path) -> None:
    """Remember that this version of ``path`` passed :func:`verify_checksums` in this process."""
    key = file_key(path)
    if key is not None:
        _verified.add(key)


def already_verified(path: str | Path) -> bool:
    key = file_key(path)
    return key is not None and key in _verified


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` holding a NaN or an infinity (local shards of DTensors)."""
    floating = {
        name: (t.to_local() if type(t).__name__ == "DTensor" else t).detach()
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta"
    }
    if not floating:
        return []
    # One reduction per tensor and one device sync for all of them (a per-tensor `.item()` would sync each time).
    finite = torch.stack([torch.isfinite(t).all().to(_device(floating)) for t in floating.values()])
    if bool(finite.all()):
        return []
    return [name for name, ok in zip(floating, finite.tolist(), strict=True) if not ok]


def _device(tensors: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(tensors.values())).device
