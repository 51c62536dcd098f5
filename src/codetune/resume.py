"""Resume after a crash exactly where the run stopped: RNG states per rank, atomic checkpoints, ``--ckpt_path last``.

Lightning restores weights, optimizer, scheduler, loop counters and a stateful dataloader's position, but saves
no RNG state, and writes checkpoints in place (a sharded FSDP checkpoint is a folder filled file by file). So:

- :class:`RNGState` saves the Python, NumPy, torch CPU and CUDA generators of every rank with each checkpoint
  and puts them back just before the first training step after a resume. Validation runs on a side branch of the
  stream (the state after the last training step is put back when it ends), so how often a run validates does
  not change its training randomness, and a checkpoint taken just before validation resumes exactly.
- :class:`AtomicCheckpoint` (Lightning's ``ModelCheckpoint``) writes every checkpoint — a ``.ckpt`` file or a
  sharded folder — next to its final name and renames it into place once complete, so a process killed while
  saving leaves the previous checkpoint intact; what a killed save left behind is removed when the run starts
  again. ``last`` is a hard link to the newest checkpoint where one was just written (one copy on disk, not two).
  ``ckpt_path="last"`` also finds the newest ``last`` of earlier runs in the same log folder.
- An interrupted run (SIGTERM from a scheduler, Ctrl-C) stops at the end of the current step, saves ``last``
  and exits with 143 / 130 (:class:`GracefulStop`); a second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from codetune.checkpoints.locate import intact
from codetune.lightning_private import is_local_path, request_graceful_stop

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
"""A checkpoint being written: ``last.ckpt.partial`` becomes ``last.ckpt`` only once complete."""
PREVIOUS_SUFFIX = ".previous"
"""A sharded checkpoint folder being replaced; put back if the run dies between the two renames."""


# ---- RNG states ------------------------------------------------------------------------------------------------
def collect_rng_state() -> dict[str, Any]:
    """This process's generator states as tensors and plain Python values, so the checkpoint still loads with
    ``torch.load(weights_only=True)`` (Lightning's own default when resuming)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back a state from :func:`collect_rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGState(L.Callback):
    """Saves every rank's RNG states in the checkpoint and restores them on resume (Lightning saves none).

    The state saved is the one after the last training step; it is put back just before the first training step
    of the resumed run, so whatever Lightning runs in between on resume (loading, a sanity check, new DataLoader
    iterators) cannot shift it. Exact as long as the training DataLoader draws its shuffling and worker seeds
    from its own ``generator`` (codetune's data module does): a loader without one takes a seed from the global
    generator at every new epoch, which a resumed run does at different moments.
    """

    def __init__(self) -> None:
        self._after_step: dict[str, Any] | None = None
        self._before_first_step: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "RNGState"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The state the next training step starts from; checkpoints save this one (see on_validation_end).
        self._after_step = collect_rng_state()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation draws too (its DataLoader iterator takes a seed from the global generator); undoing that
        # keeps the training stream independent of validation, so a checkpoint saved before it resumes exactly.
        if trainer.state.fn == TrainerFn.FITTING and self._after_step is not None:
            set_rng_state(self._after_step)

    def state_dict(self) -> dict[str, Any]:
        mine = self._after_step or collect_rng_state()
        return {"world_size": _world_size(), "states": _gather(mine)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_world = int(state_dict["world_size"])
        if saved_world != _world_size():
            log.warning(
                "checkpoint RNG states are from %d processes, this run has %d: randomness (dropout, FIM, "
                "sampling) will not continue the interrupted run exactly",
                saved_world,
                _world_size(),
            )
            return
        self._before_first_step = state_dict["states"][_rank()]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            log.warning("the checkpoint has no RNG states (not written by codetune): randomness will differ")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._before_first_step is not None:
            set_rng_state(self._before_first_step)
            self._before_first_step = None


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _gather(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's state, in rank order, on every rank (only rank 0 writes the checkpoint's non-tensor part)."""
    if not torch.distributed.is_initialized():
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


# ---- atomic checkpoints ----------------------------------------------------------------------------------------
class AtomicCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose writes are atomic, and whose ``last`` survives a new run version.

    Every checkpoint is written to ``<name>.partial`` and renamed to ``<name>`` when complete. A file replaces
    its predecessor in one ``os.replace``; a sharded folder cannot, so the old folder is first renamed to
    ``<name>.previous`` and removed after the new one is in place; a run killed between the two renames gets its
    ``.previous`` back when ``last`` is next looked up, and the ``.partial`` of a killed save is removed when the
    run starts again. Remote (non-local) paths are written as Lightning does.

    ``save_last: link`` (the default of ``codetune fit``) makes ``last`` a hard link to the checkpoint written
    at the same step, so the weights are on disk once; where hard links are impossible, a relative symbolic
    link, then a copy. On an interruption (:class:`GracefulStop`) ``last`` itself is written.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            own_dir = Path(self._ModelCheckpoint__resolve_ckpt_dir(trainer))
            if is_local_path(str(own_dir)):
                for folder in [own_dir, *_sibling_checkpoint_dirs(own_dir)]:
                    recover(folder)
                    remove_partials(folder)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        if not is_local_path(filepath):
            return super()._save_checkpoint(trainer, filepath)
        partial = filepath + PARTIAL_SUFFIX
        if trainer.is_global_zero:
            _remove(Path(partial))  # left by a save that was killed
        trainer.strategy.barrier("AtomicCheckpoint.clean")
        trainer.save_checkpoint(partial, self.save_weights_only)  # every rank: sharded saves are collective
        if trainer.is_global_zero:
            commit(Path(partial), Path(filepath))
        trainer.strategy.barrier("AtomicCheckpoint.commit")
        # What ModelCheckpoint._save_checkpoint records after a save, now under the final name.
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        # Lightning removes `last` and then symlinks it: a kill in between leaves no `last`, and a symlink dangles
        # once the checkpoint it names is rotated out. A hard link, made beside and renamed over `last`, has neither
        # problem and shares the bytes.
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link_or_copy(Path(filepath), Path(linkpath))
        trainer.strategy.barrier("AtomicCheckpoint.link")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
        interrupted = isinstance(exception, SIGTERMException) and stop is not None and stop.safe_to_save
        if not interrupted or not self.save_last or self._last_global_step_saved == trainer.global_step:
            return super().on_exception(trainer, pl_module, exception)  # saves only with save_on_exception
        # Stopped between two steps: a consistent state, worth keeping. `last` is written itself, not linked to
        # an older checkpoint.
        save_last, self.save_last = self.save_last, True
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self.save_last = save_last
        stop.saved = self.last_model_path

    def _find_last_checkpoints(self, trainer) -> set[str]:
        own_dir = Path(self._ModelCheckpoint__resolve_ckpt_dir(trainer))
        if is_local_path(str(own_dir)):
            recover(own_dir)
        found = super()._find_last_checkpoints(trainer)
        if found or self.dirpath is not None or not trainer.loggers:
            return found
        # A new `codetune fit` logs to a new run folder (version_N, or a W&B run id): its own checkpoint folder
        # is empty; the candidates are the `last` checkpoints of the earlier runs beside it, of which Lightning
        # takes the newest.
        for checkpoints in _sibling_checkpoint_dirs(own_dir):
            recover(checkpoints)
            found |= {str(p) for p in last_checkpoints(checkpoints)}
        return found


class GracefulStop(L.Callback):
    """Ctrl-C and SIGTERM stop the run at the end of the current training step, where ``last`` can be saved.

    Lightning already turns SIGTERM (what SLURM and Kubernetes send before a kill) into a stop at the end of the
    step, but then exits with status 0, as if the run had finished. Here the first Ctrl-C does the same, a second
    one stops at once (nothing saved: a step cut in half is not a state to resume from). :class:`AtomicCheckpoint`
    saves ``last`` when the stop came between two training steps; the CLI exits with 143 (SIGTERM) or 130
    (Ctrl-C) and prints the command that resumes.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        """The signal that stopped the run (``signal.SIGINT``/``SIGTERM``), None while it runs."""
        self.saved: str | None = None
        """``last`` as saved on the stop (None: nothing new to save, or not at a safe point)."""
        self.step: int | None = None
        self._previous_sigint: Any = None
        self._stage: RunningStage | None = None

    @property
    def safe_to_save(self) -> bool:
        """Stopped between training steps (not inside a validation, whose loop state a checkpoint would cut)."""
        return self._stage == RunningStage.TRAINING

    def on_train_start(self, trainer, pl_module) -> None:
        self.signal, self.saved = None, None
        self._stage = RunningStage.TRAINING
        if not _main_thread():
            return
        self._previous_sigint = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame) -> None:
            if self.signal == signal.SIGINT:  # the second Ctrl-C: stop now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.signal = signal.SIGINT
            request_graceful_stop(trainer)
            if trainer.is_global_zero:
                print(
                    "\ncodetune: stopping after this step and saving last (Ctrl-C again stops at once, unsaved)",
                    flush=True,
                )

        signal.signal(signal.SIGINT, on_sigint)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stage = RunningStage.VALIDATING

    def on_validation_end(self, trainer, pl_module) -> None:
        self._stage = RunningStage.TRAINING

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException | KeyboardInterrupt):
            self.signal = self.signal or (
                signal.SIGTERM if isinstance(exception, SIGTERMException) else signal.SIGINT
            )
            self.step = trainer.global_step
            if isinstance(exception, KeyboardInterrupt):
                self._stage = None  # cut mid-step
        self._restore()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous_sigint is not None and _main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _sibling_checkpoint_dirs(own_dir: Path) -> list[Path]:
    """The ``checkpoints`` folders of the other runs logged beside this one (``<name>/version_*/checkpoints``)."""
    run = own_dir.parent
    if not run.parent.is_dir():
        return []
    return [p / "checkpoints" for p in run.parent.iterdir() if p != run and (p / "checkpoints").is_dir()]


_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")


def last_checkpoints(folder: Path) -> list[Path]:
    """The ``last`` checkpoints in a ``checkpoints`` folder (never a ``.partial`` or ``.previous``)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if _LAST.match(p.name) and (p.exists() or p.is_symlink())]


def run_checkpoints(root: str | Path) -> list[Path]:
    """Every checkpoint (file or sharded folder) under a run root: ``<root>/<name>/<version>/checkpoints/*.ckpt``
    and ``<root>/checkpoints/*.ckpt`` (no logger)."""
    root = Path(root).expanduser()
    found = [*root.glob("*/*/checkpoints/*.ckpt"), *root.glob("checkpoints/*.ckpt")]
    return [p for p in found if p.exists()]


def newest_intact(candidates: list[Path]) -> Path | None:
    """The most recently written of ``candidates`` that passes the cheap structural check."""
    whole = [p for p in candidates if p.exists() and intact(p)]
    return max(whole, key=lambda p: p.stat().st_mtime) if whole else None


def remove_partials(folder: Path) -> list[Path]:
    """Remove what killed saves left in ``folder`` (``*.partial`` files and folders; codetune's names only)."""
    removed = []
    for partial in folder.glob(f"*.ckpt{PARTIAL_SUFFIX}") if folder.is_dir() else []:
        log.info("removing %s, left by a save that was killed", partial)
        _remove(partial)
        removed.append(partial)
    return removed


def link_or_copy(target: Path, link: Path) -> None:
    """Make ``link`` name the same checkpoint as ``target``, atomically: a hard link for a file, else a relative
    symbolic link (a sharded folder, or a filesystem without hard links), else a copy."""
    tmp = link.with_name(link.name + PARTIAL_SUFFIX)
    _remove(tmp)
    try:
        if target.is_file():
            os.link(target, tmp)
        else:
            os.symlink(os.path.relpath(target, link.parent), tmp)
    except OSError:
        try:
            os.symlink(os.path.relpath(target, link.parent), tmp)
        except OSError:
            log.warning("cannot link %s to %s on this filesystem: copying it", link, target)
            _remove(tmp)
            if target.is_dir():
                shutil.copytree(target, tmp)
            else:
                shutil.copy2(target, tmp)
    commit(tmp, link)


def commit(partial: Path, final: Path) -> None:
    """Move a completely written checkpoint (file or folder) to its final name, atomically for files."""
    _fsync_tree(partial)
    if (partial.is_file() or partial.is_symlink()) and not (final.is_dir() and not final.is_symlink()):
        os.replace(partial, final)
    else:
        previous = final.with_name(final.name + PREVIOUS_SUFFIX)
        _remove(previous)
        if final.exists() or final.is_symlink():
            os.replace(final, previous)
        os.replace(partial, final)
        _remove(previous)
    _fsync_dir(final.parent)


def recover(folder: Path) -> None:
    """Finish what a killed save left in ``folder``: a ``.previous`` without its successor is put back;
    ``.partial`` leftovers stay out of the way (they never match a checkpoint name) and are replaced by the next
    save."""
    if not folder.is_dir():
        return
    for previous in folder.glob(f"*{PREVIOUS_SUFFIX}"):
        final = previous.with_name(previous.name[: -len(PREVIOUS_SUFFIX)])
        if not final.exists():
            log.warning("restoring %s: the run was killed while replacing it", final)
            try:
                os.replace(previous, final)
            except FileNotFoundError:  # another rank of this run got there first
                pass


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(path: Path) -> None:
    """Flush a checkpoint's bytes to disk before it gets its final name (a rename may reach the disk first)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in [*files, *([path] if path.is_dir() else [])]:
        _fsync(file)


def _fsync_dir(path: Path) -> None:
    _fsync(path)


def _fsync(path: Path) -> None:
    # Best effort: some filesystems refuse to open directories, or to sync what another node wrote.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
