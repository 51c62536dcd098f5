"""``codetune fit|validate|test``: a recipe through LightningCLI, with codetune's defaults and an end-of-run summary.

LightningCLI's subcommands are Trainer methods; it builds model, data and Trainer from the recipe for each.
:class:`CodetuneCLI` adds what codetune needs around that: its callbacks (progress with tokens/s, atomic
checkpoints carrying RNG states), a CSV logger by default, the one tokenizer linked from the data module into
the model, checks of ``trainer.devices`` and ``--ckpt_path`` before anything is built, a validation before and
after ``fit``, and the summary.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI

import codetune.strategies  # noqa: F401  (registers the strategy name "fsdp2" with Lightning)
from codetune.callbacks import ProgressBar, StepStats, Throughput
from codetune.checkpoints import locate
from codetune.checkpoints.format import checkpoint_shapes
from codetune.commands.recipe_errors import check_moved_class_paths, condensed_parse_errors
from codetune.commands.summary import print_plan, print_summary, val_loss, val_losses
from codetune.data.datamodule import CodeDataModule
from codetune.model.adapters import Quantization
from codetune.model.sharding import check_shardable_quantization
from codetune.modules.causal import CausalLM
from codetune.optim import check_training_precision
from codetune.resume import AtomicCheckpoint, RNGState
from codetune.strategies import check_fsdp_optimizer

RECIPE_COMMANDS = ("fit", "validate", "test")

# Attribute docstrings of recipe dataclasses (ModelSpec, FIMConfig, ...) become --help text and the reference.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class CodetuneCLI(LightningCLI):
    """LightningCLI with codetune's defaults, the tokenizer link and an end-of-run summary."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        self.initial_val_loss: float | None = None
        self.final_val_loss: float | None = None
        # Per source (val/loss/<name>), when the stage logs them.
        self.initial_val_losses: dict[str, float] = {}
        self.final_val_losses: dict[str, float] = {}
        self.fit_seconds: float = 0.0
        super().__init__(
            CausalLM,
            CodeDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": False},
            trainer_defaults={
                "default_root_dir": "runs",
                # Checkpoints are written atomically and carry every rank's RNG states (codetune.resume).
                "callbacks": [
                    ProgressBar(leave=True),
                    Throughput(),
                    StepStats(),
                    AtomicCheckpoint(save_last=True),
                    RNGState(),
                ],
            },
            args=args,
            run=run,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_moved_class_paths(config.as_dict())
        trainer = config.trainer
        # CSV by default (no extra dependency), TensorBoard beside it when installed; W&B or others when the
        # recipe names their logger. Made in instantiate_trainer, not written into the config: a run's saved
        # config.yaml then trains again under another --trainer.default_root_dir, not into the old run's folder.
        self._default_logger = trainer.logger in (None, True)
        self._log_root = trainer.default_root_dir or "runs"
        if trainer.enable_progress_bar is False:
            self.trainer_defaults["callbacks"] = [
                c for c in self.trainer_defaults["callbacks"] if not isinstance(c, RichProgressBar)
            ]
        if _use_atomic_checkpoints(trainer.callbacks):
            # The recipe configures its own checkpointing (e.g. every_n_train_steps): no second default one.
            self.trainer_defaults["callbacks"] = [
                c for c in self.trainer_defaults["callbacks"] if not isinstance(c, ModelCheckpoint)
            ]
        check_devices(trainer)
        check_recipe_for_strategy(config, self.subcommand)

    def instantiate_trainer(self, **kwargs: Any):
        if getattr(self, "_default_logger", False) and "logger" not in kwargs:
            kwargs["logger"] = default_loggers(self._log_root)
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        # A rejected recipe is one line (the key, the problem, the fix), not a usage block and an error tree.
        parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
        for each in parsers:
            each.exit_on_error = False
        if args is None:  # Lightning re-runs sys.argv in the other processes: the rewrite goes there too
            sys.argv = [sys.argv[0], *sources_replace(sys.argv[1:])]
        elif isinstance(args, list | tuple):
            args = sources_replace(list(args))
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            options = {o for each in parsers for o in each._option_string_actions if o.startswith("--")}
            raise ValueError(condensed_parse_errors(str(err), options)) from None

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would torch.load the whole checkpoint here, optimizer states included, on every rank, to
        # replace the recipe's model arguments by the checkpoint's. In codetune the recipe decides the model and
        # the checkpoint must fit it (its shapes are compared when it loads); here it only has to exist and be
        # readable, checked without reading the weights.
        if self.config.get("subcommand"):
            config = self.config[self.config.subcommand]
            config["ckpt_path"] = check_ckpt_path(config.get("ckpt_path"))

    def add_arguments_to_parser(self, parser) -> None:
        # One tokenizer for both sides: the model sizes its embeddings from the data module's tokenizer.
        parser.link_arguments(
            "data", "model.init_args.tokenizer", compute_fn=_tokenizer_of, apply_on="instantiate"
        )

    def before_fit(self) -> None:
        resuming = self.config[self.subcommand].get("ckpt_path") is not None
        # A resumed run's "before" is the checkpoint, not the freshly built model: no validation of the latter.
        if self.trainer.limit_val_batches != 0 and not resuming:
            metrics = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self.initial_val_loss, self.initial_val_losses = val_loss(metrics), val_losses(metrics)
        if self.trainer.is_global_zero:
            print_plan(self)
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_started
        if self.trainer.limit_val_batches != 0:
            metrics = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self.final_val_loss, self.final_val_losses = val_loss(metrics), val_losses(metrics)
        run_dir = self.trainer.log_dir  # a broadcast under multi-process strategies: every rank must ask
        if self.trainer.is_global_zero:
            print_summary(self, run_dir)


_CHECKPOINT_CLASSES = {
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
}
_FSDP_STRATEGIES = ("fsdp2", "codetune.strategies.FSDP2Strategy", "ModelParallelStrategy")


def _use_atomic_checkpoints(callbacks: Any) -> bool:
    """Swap a recipe's Lightning ``ModelCheckpoint`` for :class:`AtomicCheckpoint` (same arguments, atomic writes);
    True when the recipe configures checkpointing itself."""
    found = False
    for callback in callbacks or []:
        class_path = callback.get("class_path") if hasattr(callback, "get") else None
        if class_path in _CHECKPOINT_CLASSES:
            callback["class_path"] = "codetune.resume.AtomicCheckpoint"
        found = found or class_path in (*_CHECKPOINT_CLASSES, "codetune.resume.AtomicCheckpoint")
    return found


def default_loggers(save_dir: str, tensorboard: bool | None = None) -> list[Any]:
    """A CSV logger, and TensorBoard's (when installed) writing into the same version folder: one run, one
    directory (``metrics.csv``, ``tensorboard/`` event files)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv = CSVLogger(save_dir=save_dir)
    if not (tensorboard_installed() if tensorboard is None else tensorboard):
        return [csv]
    return [
        csv,
        TensorBoardLogger(save_dir=save_dir, name=csv.name, version=csv.version, sub_dir="tensorboard"),
    ]


def tensorboard_installed() -> bool:
    """Whether Lightning's TensorBoard logger can write (the ``tensorboard`` extra, or tensorboardX)."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def check_devices(trainer: Any) -> None:
    """Fail before anything is built when ``trainer.devices`` asks for more devices than the machine has; run
    FSDP with a single process as a plain single-device run, with a warning (sharding over one process saves
    nothing and costs the wrapping)."""
    import torch

    devices = trainer.get("devices", "auto")
    indices = None  # GPU indices, when devices names them ([0, 3] or "0,3")
    if isinstance(devices, list | tuple):
        indices = [int(d) for d in devices]
    elif isinstance(devices, str) and "," in devices:
        indices = [int(d) for d in devices.split(",") if d.strip()]
    wanted = len(indices) if indices is not None else devices
    if isinstance(wanted, str) and wanted.strip().lstrip("-").isdigit():
        wanted = int(wanted)
    accelerator = str(trainer.get("accelerator") or "auto")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in ("cpu", "gpu", "cuda", "auto") and isinstance(wanted, int) and wanted > 0:
        if on_gpu:
            # device_count honours CUDA_VISIBLE_DEVICES: what this process can see, not what the node has
            available, kind = torch.cuda.device_count(), "visible CUDA GPU(s)"
        else:
            available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            kind = "CPU core(s) (one process per device)"
        if wanted > (available or 1):
            raise ValueError(
                f"trainer.devices={wanted} but this machine has {available} {kind}; lower trainer.devices "
                "(more machines: trainer.num_nodes, see docs/scaling.md)"
            )
        beyond = [i for i in indices or [] if i >= available or i < 0]
        if on_gpu and beyond:
            raise ValueError(
                f"trainer.devices={list(indices)} names GPU {beyond[0]}, but {available} {kind} are numbered "
                f"0-{available - 1} (CUDA_VISIBLE_DEVICES renumbers them from 0); name visible GPUs or give a count"
            )
    strategy = trainer.get("strategy")
    name = strategy if isinstance(strategy, str) else (strategy.get("class_path") if strategy else None)
    processes = (
        wanted * int(trainer.get("num_nodes") or 1) if isinstance(wanted, int) and wanted > 0 else None
    )
    if name and name.endswith(_FSDP_STRATEGIES) and processes == 1:
        logging.getLogger(__name__).warning(
            "trainer.strategy=%s with a single device: running unsharded (strategy auto) instead; FSDP needs "
            "trainer.devices > 1 (or num_nodes > 1), and a model that only fits sharded will not fit here",
            name.rsplit(".", 1)[-1],
        )
        trainer.strategy = "auto"


def check_recipe_for_strategy(config: Any, subcommand: str | None) -> None:
    """Refuse, before any data or weights are read, what would fail (or silently train wrong) only at the first
    step: ``bf16-true`` training, and under FSDP2 a bitsandbytes optimizer or a 4-bit base not stored as bf16."""
    trainer = config.trainer
    if subcommand == "fit":
        check_training_precision(trainer.get("precision"))
    strategy = trainer.get("strategy")
    name = strategy if isinstance(strategy, str) else (strategy.get("class_path") if strategy else None)
    if not (name and name.endswith(_FSDP_STRATEGIES)):
        return
    model = config.get("model")
    init_args = (model.get("init_args") if hasattr(model, "get") else None) or {}
    spec = init_args.get("model") if hasattr(init_args, "get") else None
    quantization = spec.get("quantization") if hasattr(spec, "get") else None
    if quantization is not None:
        values = quantization.as_dict() if hasattr(quantization, "as_dict") else dict(quantization)
        check_shardable_quantization(Quantization(**values))
    optimizer = init_args.get("optimizer") if hasattr(init_args, "get") else None
    class_path = optimizer.get("class_path") if hasattr(optimizer, "get") else None
    if subcommand == "fit" and isinstance(class_path, str) and "." in class_path:
        module_name, _, class_name = class_path.rpartition(".")
        try:
            optimizer_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            return  # LightningCLI names an unknown class itself
        if isinstance(optimizer_class, type):
            check_fsdp_optimizer(optimizer_class)


def check_ckpt_path(ckpt_path: Any) -> Any:
    """``--ckpt_path`` must exist (``last``/``best``/``hpc`` are resolved by Lightning; ``last`` before any run
    is not an error, so a resume command can be used from the start). A run directory stands for its newest
    ``last.ckpt``, as for ``codetune export`` and ``eval``; returns the checkpoint to use."""
    special = str(ckpt_path) in ("last", "best", "hpc") or str(ckpt_path).startswith("registry")
    if ckpt_path is None or special or "://" in str(ckpt_path):
        return ckpt_path
    if not Path(ckpt_path).expanduser().exists():
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path}: no such checkpoint file or folder (use --ckpt_path last to resume the "
            "newest run of this recipe's default_root_dir)"
        )
    location = locate(ckpt_path)
    if location.kind != "checkpoint":
        raise ValueError(
            f"--ckpt_path {ckpt_path}: an exported model folder, not a training checkpoint; start from it with "
            "--model.init_args.model.name_or_path instead"
        )
    checkpoint_shapes(location.path)  # readable at all? (memory-mapped / index only: cheap)
    return str(location.path)


_SOURCES_KEYS = ("--data.init_args.sources", "--data.sources")
_CLEAR_SOURCES = "--data.init_args.sources=[]"


def sources_replace(args: list[str]) -> list[str]:
    """``args`` with ``data.sources`` cleared before each later setting of it, so a source list given on top of a
    recipe *replaces* the recipe's list.

    jsonargparse merges two lists of equal length entry by entry, so one user source on top of the stdlib recipe
    silently inherited its ``exclude: [test/**, ...]``, ``max_files`` and ``on_error`` (issue 12/14). Lists of
    sources now follow one rule, whatever sets them (``--data file.yaml``, a second ``--config``, a dotted
    ``--data.init_args.sources``): the later list replaces the earlier one; ``--data.init_args.sources+=[...]``
    still appends.
    """
    out: list[str] = []
    seen = False  # sources already set by an earlier argument
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=")
        takes_value = not eq and i + 1 < len(args) and not args[i + 1].startswith("--")
        value = inline if eq else (args[i + 1] if takes_value else None)
        consumed = [arg] + ([args[i + 1]] if takes_value else [])
        sets = False
        if flag in _SOURCES_KEYS and value is not None:
            sets = value.strip() != "[]"
        elif flag == "--data" and value is not None:
            sets = _data_has_sources(value, Path.cwd())
        elif flag == "--config" and value is not None:
            sets = _config_has_sources(value)
        if sets and seen:
            out.append(_CLEAR_SOURCES)
        seen = seen or sets
        out.extend(consumed)
        i += len(consumed)
    return out


def _load_yaml(value: str, base: Path) -> tuple[Any, Path]:
    """A YAML file's content (and the folder its relative paths start from), or an inline YAML value."""
    import yaml

    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        if value.endswith((".yaml", ".yml")) and path.is_file():
            return yaml.safe_load(path.read_text(encoding="utf-8")), path.parent
        return yaml.safe_load(value), base
    except (yaml.YAMLError, OSError):
        return None, base  # the parser reports a bad file in its own words


def _data_has_sources(value: Any, base: Path) -> bool:
    if isinstance(value, str):
        value, base = _load_yaml(value, base)
    if not isinstance(value, dict):
        return False
    init = value.get("init_args") if isinstance(value.get("init_args"), dict) else value
    return "sources" in init


def _config_has_sources(value: str) -> bool:
    recipe, base = _load_yaml(value, Path.cwd())
    if not isinstance(recipe, dict):
        return False
    recipe = recipe.get("fit", recipe) if isinstance(recipe.get("fit"), dict) else recipe
    return "data" in recipe and _data_has_sources(recipe["data"], base)


def _tokenizer_of(datamodule):
    return datamodule.tokenizer
