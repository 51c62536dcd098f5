"""Every shipped YAML parses and instantiates, with the expensive parts swapped for tiny ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from codetune.commands.fit import CodetuneCLI

REPO = Path(__file__).resolve().parents[1]


def _is_training_recipe(path: Path) -> bool:
    """A LightningCLI recipe (``model: {class_path: ...}``), not the config of a function command."""
    return isinstance(yaml.safe_load(path.read_text()).get("model"), dict)


RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if _is_training_recipe(p))
COMMAND_CONFIGS = sorted(p for p in (REPO / "recipes").glob("*.yaml") if not _is_training_recipe(p))
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


DEMO_CONVERSATIONS = REPO / "data_modules" / "data" / "instruct-demo.jsonl"


def generated_inputs_override(data_module: Path | None, tmp_path: Path) -> list[str]:
    """Sources reading what an earlier command writes under ``runs/`` (``codetune selfinstruct``'s kept set) read
    the shipped demo conversations instead: the file does not exist until that command has run."""
    if data_module is None:
        return []
    spec = yaml.safe_load(data_module.read_text())
    swapped = False
    for source in spec.get("init_args", {}).get("sources", []):
        args = source.get("init_args", source)
        if str(args.get("path", "")).startswith("runs/"):
            args["path"] = str(DEMO_CONVERSATIONS)
            swapped = True
    if not swapped:
        return []
    copy = tmp_path / f"generated-inputs-{data_module.name}"
    copy.write_text(yaml.safe_dump(spec))
    return ["--data", str(copy)]


def data_module_of(recipe: Path) -> Path | None:
    data = yaml.safe_load(recipe.read_text()).get("data")
    return (recipe.parent / data).resolve() if isinstance(data, str) else None


def test_the_catalogue_is_not_empty():
    assert (REPO / "recipes" / "quickstart.yaml") in RECIPES
    assert DATA_MODULES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_instantiates(recipe, tmp_path):
    cli = CodetuneCLI(
        args=[
            "--config",
            str(recipe),
            *generated_inputs_override(data_module_of(recipe), tmp_path),
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
            *generated_inputs_override(data_module, tmp_path),
            TINY_TOKENIZER,
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.model.tokenizer is cli.datamodule.tokenizer


def _command_of(config: Path):
    """The function command a shipped command config belongs to (by its file name)."""
    from codetune.commands.selfinstruct import selfinstruct

    commands = {"selfinstruct": selfinstruct}
    name = next((n for n in commands if config.stem.startswith(n)), None)
    assert name is not None, f"{config.name}: not a training recipe and no command claims it"
    return commands[name]


@pytest.mark.parametrize("config", COMMAND_CONFIGS, ids=lambda p: p.name)
def test_command_config_parses(config):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(_command_of(config))
    parser.instantiate_classes(parser.parse_args(["--config", str(config)]))


# Recipes whose base is a real family, and the fixture vocabulary of that family (see tests/vocabularies.py).
FAMILY_RECIPES = {
    "quickstart-starcoder2.yaml": ("llama.cpp:starcoder", "starcoder"),
    "starcoder2-3b-fim-lora.yaml": ("llama.cpp:starcoder", "starcoder"),
    "codellama-7b-fim-qlora.yaml": ("codellama-spm", "codellama-hf"),
    "codellama-7b-instruct-rehearsal.yaml": ("codellama-spm", "codellama-hf"),
    "codellama-7b-lcft-16k.yaml": ("codellama-spm", "codellama-hf"),
}


@pytest.mark.parametrize("name", sorted(FAMILY_RECIPES))
def test_a_family_recipes_data_side_on_its_real_vocabulary(request, name, tmp_path):
    from codetune.data.chat import ChatEncoder
    from codetune.data.tokenizer import SENTINEL_SETS, fim_sentinels
    from tests.vocabularies import vocabulary

    vocab, expected = FAMILY_RECIPES[name]
    if vocab == "codellama-spm":
        folder = request.getfixturevalue("codellama_spm")
    else:
        folder = vocabulary(vocab.removeprefix("llama.cpp:"))
    recipe = REPO / "recipes" / name
    cli = CodetuneCLI(
        args=[
            "--config",
            str(recipe),
            *generated_inputs_override(data_module_of(recipe), tmp_path),
            f"--data.init_args.tokenizer.name_or_path={folder}",
            *tiny_model_override(recipe),
            *cpu_trainer_override(recipe),
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    tokenizer = cli.datamodule.tokenizer
    assert fim_sentinels(tokenizer) == SENTINEL_SETS[expected]
    from transformers import AutoTokenizer

    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(folder))  # the family's own rows: none added
    if any("ChatFiles" in str(s) for s in yaml.safe_load(recipe.read_text())["data"]["init_args"]["sources"]):
        # The recipe's own template on SentencePiece: the ids are those of the rendered text (defect 1).
        encoder = ChatEncoder(tokenizer, cli.datamodule.chat_template)
        messages = [
            {"role": "user", "content": "Write f."},
            {"role": "assistant", "content": "def f():\n    pass"},
        ]
        assert encoder.encode(messages)[0] == tokenizer(encoder.render(messages))["input_ids"]
