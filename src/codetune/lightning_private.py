"""Every private Lightning API codetune touches, in one place.

Lightning's private names change between releases without notice. codetune imports the private functions it
uses from here, and lists here the private methods it overrides or calls on Lightning's classes, so an upgrade
that renames one fails in ``tests/test_lightning_private.py`` — one obvious test — instead of deep in a run.
The Lightning versions these were checked against: ``lightning>=2.6,<2.7`` (pyproject).
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol as is_local_path
from lightning.fabric.utilities.load import _load_distributed_checkpoint as load_distributed_checkpoint

__all__ = [
    "OVERRIDDEN",
    "evaluate_under_no_grad",
    "is_local_path",
    "load_distributed_checkpoint",
    "request_graceful_stop",
]


def evaluate_under_no_grad(trainer: Any) -> None:
    """Make ``trainer.validate/test/predict`` run under ``torch.no_grad`` instead of ``torch.inference_mode``.

    Lightning evaluates in inference mode except on gloo and under its old FSDP strategy
    (``lightning/pytorch/loops/utilities.py``, ``_no_grad_context``). Under FSDP2 the first all-gather then
    allocates FSDP2's reusable unshard buffers as inference tensors, and the next unshard outside inference mode
    (the first training step after ``codetune fit``'s validation) fails with "Inplace update to inference tensor
    outside InferenceMode" (pytorch#197327, Lightning#16908). The loops' ``inference_mode`` flag (an attribute
    of Lightning's private loop classes) is what ``Trainer(inference_mode=False)`` sets.
    """
    for loop in (trainer.validate_loop, trainer.test_loop, trainer.predict_loop):
        if not hasattr(loop, "inference_mode"):
            raise AttributeError(
                f"{type(loop).__name__} has no `inference_mode` flag any more: update "
                "codetune.lightning_private.evaluate_under_no_grad for this Lightning version"
            )
        loop.inference_mode = False


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
