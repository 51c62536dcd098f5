"""Where a run keeps its checkpoints, and what a user-given path is: a checkpoint, a run directory, an export.

Lightning writes ``<root>/lightning_logs/version_N/checkpoints/last.ckpt`` (or a sharded folder of that name);
every command that takes a trained model accepts any of those levels and resolves it here.
"""

from __future__ import annotations

import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
FIT_SUMMARY = "fit_summary.json"
"""The run's record in its log directory, written at the end of ``codetune fit``; the model card states it."""
DISTRIBUTED_METADATA = ".metadata"
"""torch.distributed.checkpoint's index file: its presence makes a folder a sharded checkpoint."""
_VERSION = re.compile(r"^version_(\d+)$")


@dataclass(frozen=True)
class Location:
    """What a user-given path turned out to be."""

    kind: Literal["checkpoint", "hf_folder", "adapter_folder"]
    """``checkpoint``: a Lightning checkpoint (file, or a sharded folder); ``hf_folder``: an exported model;
    ``adapter_folder``: a PEFT adapter written by ``codetune export --adapter_only``."""
    path: Path
    """The checkpoint file/folder or the model folder itself."""
    run_dir: Path | None = None
    """The run's log directory (``config.yaml``, ``metrics.csv``, ``eval/``) when the checkpoint sits in one."""


def locate(path: str | Path) -> Location:
    """Resolve ``path`` to a checkpoint or an exported folder.

    Accepts a ``.ckpt`` file, a run directory (``runs/x``, ``runs/x/lightning_logs``,
    ``runs/x/lightning_logs/version_N`` → its ``checkpoints/last.ckpt``; the highest version when several
    exist), a ``checkpoints/`` folder, a sharded (FSDP2) checkpoint folder, or an exported Hugging Face folder.
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint, run directory or model folder")
    if given.is_file():
        return Location("checkpoint", given, _run_dir_of(given))
    if (given / "adapter_config.json").is_file():
        return Location("adapter_folder", given)
    if (given / "config.json").is_file():
        return Location("hf_folder", given)
    if (given / DISTRIBUTED_METADATA).is_file():
        return Location("checkpoint", given, _run_dir_of(given))
    if given.name == "checkpoints":
        return Location("checkpoint", _checkpoint_in(given), given.parent)
    if (given / "checkpoints").is_dir():
        return Location("checkpoint", _checkpoint_in(given / "checkpoints"), given)
    run_dir = _newest_version(given)
    if run_dir is None:
        raise FileNotFoundError(
            f"{path}: not a checkpoint, run directory or model folder (expected a .ckpt file, a run folder "
            "with checkpoints/last.ckpt, or an exported folder with config.json)"
        )
    return Location("checkpoint", _checkpoint_in(run_dir / "checkpoints"), run_dir)


def _newest_version(folder: Path) -> Path | None:
    """``folder`` or its ``lightning_logs`` holding ``version_N`` runs → the highest N that holds an intact
    checkpoint (a newer one holding only what a killed save left is passed over, and said so); None if there are
    no runs. Without any intact checkpoint, the highest N (its lookup then says what is missing)."""
    for parent in (folder / "lightning_logs", folder):
        versions = sorted(
            (int(m.group(1)), p)
            for p in parent.glob("version_*")
            if (m := _VERSION.match(p.name)) and (p / "checkpoints").is_dir()
        )
        if not versions:
            continue
        for _, run in reversed(versions):
            if any(intact(p) for p in (run / "checkpoints").glob("*.ckpt")):
                if run != versions[-1][1]:
                    log.warning(
                        "%s: the newest run, %s, holds no intact checkpoint; using %s",
                        folder,
                        versions[-1][1].name,
                        run.name,
                    )
                elif len(versions) > 1:
                    log.info("%s holds %d runs; using the newest, %s", folder, len(versions), run)
                return run
        return versions[-1][1]
    return None


def intact(checkpoint: Path) -> bool:
    """A whole checkpoint by its structure (a complete zip file, or a sharded folder with its index): cheap, no
    tensor is read; checksums are verified when it is read."""
    if checkpoint.is_dir():
        return (checkpoint / DISTRIBUTED_METADATA).is_file()
    return checkpoint.is_file() and checkpoint.stat().st_size > 0 and zipfile.is_zipfile(checkpoint)


def _checkpoint_in(folder: Path) -> Path:
    if (folder / LAST_CHECKPOINT).exists() and intact(folder / LAST_CHECKPOINT):
        return folder / LAST_CHECKPOINT
    if (folder / LAST_CHECKPOINT).exists():
        others = sorted((p for p in folder.glob("*.ckpt") if p.name != LAST_CHECKPOINT and intact(p)),
                        key=lambda p: p.stat().st_mtime)  # fmt: skip
        hint = f"; the newest intact one beside it is {others[-1]}" if others else ""
        raise FileNotFoundError(
            f"{folder / LAST_CHECKPOINT}: not a whole checkpoint (empty or cut off){hint}; pass that one"
        )
    found = sorted(folder.glob("*.ckpt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{folder}: no checkpoint (*.ckpt) in it; did the run save one?")
    raise FileNotFoundError(
        f"{folder}: no {LAST_CHECKPOINT} and {len(found)} checkpoints ({', '.join(p.name for p in found)}); "
        "pass the one to use"
    )


def _run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory of ``.../version_N/checkpoints/x.ckpt`` (Lightning's layout), if that is where it is."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return None


def is_training_checkpoint(name_or_path: str | None) -> bool:
    """Whether ``model.name_or_path`` names a codetune checkpoint or run directory (not a Hub id or an export)."""
    if not name_or_path:
        return False
    local = Path(name_or_path).expanduser()
    return local.is_file() or (local.is_dir() and not (local / "config.json").is_file())
