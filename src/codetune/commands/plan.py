"""``codetune plan``: the memory a recipe's training step needs per device, before anything is loaded.

The recipe is parsed by the same parser as ``codetune fit`` (overrides, nested data YAMLs, errors), nothing is
instantiated: the model is built on the meta device from its config (:mod:`codetune.planner`), so a 7B recipe is
planned in seconds on a laptop without its weights, and without a network for the Hub models codetune's recipes
name (their key config numbers ship with codetune; a cached ``config.json`` or ``--model_config`` wins).
``codetune fit`` runs the same plan before building data and stops when the peak cannot fit the visible GPUs
(``--memory_check false`` skips that).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from codetune.commands.fit import CodetuneCLI
from codetune.planner import Plan, recipe_plan


def parse_recipe(recipe: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The recipe as ``codetune fit`` parses it (``fit`` subcommand namespace as a dict); nothing is built."""

    class _ParseOnly(CodetuneCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    if not Path(recipe).is_file():
        raise FileNotFoundError(f"plan: --config {recipe}: no such file")
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = _ParseOnly(args=["--config", recipe, *(overrides or [])], run=False)
    finally:
        sys.argv = argv
    return cli.config.as_dict()


def plan(
    recipe: str,
    devices: int | None = None,
    model_config: dict[str, Any] | None = None,
    json_out: str | None = None,
    overrides: list[str] | None = None,
) -> Plan:
    """Plan a recipe's memory per device: weights, gradients, optimizer states, activations, loss; fits which GPUs.

    Args:
        recipe: The recipe (``codetune plan --config recipes/qlora-single-24gb.yaml``).
        devices: Devices the run shards over (FSDP2 recipes); default the recipe's ``trainer.devices``
            (``auto``: the visible GPUs, or 8).
        model_config: The architecture (``model_type`` + config fields) when the recipe's model has no config
            here: a Hub model outside the cache and outside codetune's table, or a run not trained yet.
        json_out: Also write the plan as JSON here.
        overrides: Recipe arguments as for ``codetune fit``, e.g. ``["--data.init_args.seq_len=8192"]``.
    """
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result = recipe_plan(parse_recipe(recipe, overrides), devices, model_config, visible)
    print(result.table())
    if json_out:
        Path(json_out).write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    return result


__all__ = ["parse_recipe", "plan"]
