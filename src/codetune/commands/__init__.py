"""codetune's commands: one function per command, faced by the CLI (``codetune NAME``) and the notebook API alike.

Each command checks its arguments, loads what it needs, does the work through the library rooms (data, model,
eval, export) and writes its results. :data:`COMMANDS` is the one table of them; an entry names its function by
``"module:attribute"`` so that ``codetune --help`` answers without importing torch, and carries the first line of
the function's docstring for that help (a test keeps the two equal).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

RECIPE_COMMANDS = ("fit", "validate", "test")
"""Commands that run a recipe through LightningCLI (:mod:`codetune.commands.fit`)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "preview": (
        "codetune.commands.preview:preview_command",
        "Write the rows a recipe trains on (JSONL) and summarise them; builds no model.",
    ),
    "plan": (
        "codetune.commands.plan:plan",
        "Plan a recipe's memory per device: weights, gradients, optimizer states, activations, loss; fits which GPUs.",
    ),
    "export": (
        "codetune.commands.export:export",
        "Export a checkpoint as a Hugging Face model folder with a model card; optionally push it to the Hub.",
    ),
    "eval": (
        "codetune.commands.evaluate:EVAL_COMMANDS",
        "Evaluate a model (humaneval, infilling, mbpp, retrieval, perplexity) or compare runs' scores (report).",
    ),
    "infill": (
        "codetune.commands.infill:infill",
        "Fill in the code between the contents of the ``prefix`` and ``suffix`` files; returns the middle.",
    ),
    "selfinstruct": (
        "codetune.commands.selfinstruct:selfinstruct",
        "Generate coding problems, unit tests and solutions; keep the first solution that passes its tests.",
    ),
}
"""Function commands: name -> (``module:attribute`` of the function, or of a dict of sub-commands; help line)."""


def resolve(name: str) -> Callable[..., Any] | dict[str, Callable[..., Any]]:
    """The function (or sub-command table) behind command ``name``, imported now."""
    module, _, attribute = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), attribute)
