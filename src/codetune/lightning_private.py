"""Every private Lightning API codetune touches, in one place.

Lightning's private names change between releases without notice. codetune imports the private functions it
uses from here, and lists here the private methods it overrides or calls on Lightning's classes, so an upgrade
that renames one fails in ``tests/test_lightning_private.py`` — one obvious test — instead of deep in a run.
The Lightning versions these were checked against: ``lightning>=2.6,<2.7`` (pyproject).
"""

from __future__ import annotations

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol as is_local_path
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed as set_num_threads
from lightning.fabric.utilities.load import _load_distributed_checkpoint as load_distributed_checkpoint

__all__ = [
    "OVERRIDDEN",
    "is_local_path",
    "load_distributed_checkpoint",
    "request_graceful_stop",
    "set_num_threads",
]


def request_graceful_stop(trainer) -> None:
    """Make ``trainer`` stop at the end of the current training step exactly as on SIGTERM (Lightning's loops then
    raise ``SIGTERMException``); Lightning has no public way to ask for that from a signal handler."""
    trainer._signal_connector.received_sigterm = True


OVERRIDDEN: dict[str, tuple[str, ...]] = {
    # AtomicCheckpoint: writes under a temporary name, finds `last` of earlier run versions.
    "lightning.pytorch.callbacks.ModelCheckpoint": (
        "_save_checkpoint",
        "_find_last_checkpoints",
        "_ModelCheckpoint__resolve_ckpt_dir",
        "_last_global_step_saved",
        "_last_checkpoint_saved",
        # on an interruption: save `last` now; `last` as a hard link to the checkpoint just written.
        "_save_last_checkpoint",
        "_monitor_candidates",
        "_link_checkpoint",
    ),
    # request_graceful_stop: the flag Lightning's SIGTERM handler sets.
    "lightning.pytorch.trainer.connectors.signal_connector._SignalConnector": ("received_sigterm",),
    # CodetuneCLI: checks --ckpt_path without torch.load-ing the whole checkpoint.
    "lightning.pytorch.cli.LightningCLI": ("_parse_ckpt_path",),
    # ProgressBar: "Epoch 0" instead of "Epoch 0/-2" for step-bounded runs.
    "lightning.pytorch.callbacks.RichProgressBar": ("_get_train_description",),
}
"""Private attributes codetune overrides or reads on Lightning classes: ``class path -> attribute names``."""
