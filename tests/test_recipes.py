"""Every shipped YAML parses and instantiates, with the expensive parts swapped for tiny ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from codetune.commands.fit import CodetuneCLI

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DATA_MODULES = sorted((REPO / "data_modules").glob("*.yaml"))
TINY_TOKENIZER = "--data.init_args.tokenizer={train: {corpus: '@stdlib', vocab_size: 1024, max_files: 60}, name_or_path: null}"


def tiny_model_override(recipe: Path) -> list[str]:
    """Swap a Hub checkpoint for a tiny model of the same family; keep adapters, RoPE and everything else."""
    from tests.conftest import TINY_LLAMA

    spec = yaml.safe_load(recipe.read_text())["model"]["init_args"]["model"]
    if spec.get("config") is not None:
        return []
    family = dict(TINY_LLAMA, model_type=spec.get("tiny_family", "llama"))
    return ["--model.init_args.model.name_or_path=null", f"--model.init_args.model.config={family}"]


def cpu_trainer_override(recipe: Path) -> list[str]:
    """GPU / multi-device recipes are instantiated on one CPU process; their own values are checked elsewhere."""
    trainer = yaml.safe_load(recipe.read_text()).get("trainer", {})
    if trainer.get("accelerator", "cpu") == "cpu" and trainer.get("devices", 1) == 1:
        return []
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
    ]


def test_the_catalogue_is_not_empty():
    assert (REPO / "recipes" / "quickstart.yaml") in RECIPES
    assert DATA_MODULES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_instantiates(recipe, tmp_path):
    cli = CodetuneCLI(
        args=[
            "--config",
            str(recipe),
            TINY_TOKENIZER,
            *tiny_model_override(recipe),
            *cpu_trainer_override(recipe),
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    cli.model.configure_model()
    assert cli.model.model is not None
    vocab = cli.model.model.get_input_embeddings().weight.shape[0]
    assert vocab >= len(cli.datamodule.tokenizer)


@pytest.mark.parametrize("data_module", DATA_MODULES, ids=lambda p: p.name)
def test_data_module_composes_with_the_quickstart(data_module, tmp_path):
    cli = CodetuneCLI(
        args=[
            "--config",
            str(REPO / "recipes" / "quickstart.yaml"),
            "--data",
            str(data_module),
            TINY_TOKENIZER,
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.model.tokenizer is cli.datamodule.tokenizer
