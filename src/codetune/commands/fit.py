"""``codetune fit|validate|test``: a recipe through LightningCLI, with codetune's defaults and an end-of-run summary.

LightningCLI's subcommands are Trainer methods; it builds model, data and Trainer from the recipe for each.
:class:`CodetuneCLI` adds what codetune needs around that: its callbacks (progress with tokens/s, atomic
checkpoints carrying RNG states), a CSV logger by default, the one tokenizer linked from the data module into
the model, checks of ``trainer.devices`` and ``--ckpt_path`` before anything is built, a validation before and
after ``fit``, and the summary.
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

import codetune.strategies  # noqa: F401  (registers the strategy name "fsdp2" with Lightning)
from codetune.callbacks import ProgressBar, StepStats, StopOnNonFinite, Throughput
from codetune.checkpoints import locate
from codetune.checkpoints.format import checkpoint_shapes, verify_checkpoint
from codetune.checkpoints.locate import intact
from codetune.commands.recipe_errors import (
    check_moved_class_paths,
    check_recipe_values,
    condensed_parse_errors,
)
from codetune.commands.summary import print_plan, print_summary, val_loss, val_losses
from codetune.data.datamodule import CodeDataModule
from codetune.model.adapters import Quantization
from codetune.model.build import absolute_base
from codetune.model.sharding import check_shardable_quantization
from codetune.modules.causal import CausalLM
from codetune.optim import check_training_precision
from codetune.planner import NoModelConfig, check_fits
from codetune.resume import (
    AtomicCheckpoint,
    GracefulStop,
    RNGState,
    last_checkpoints,
    newest_intact,
    run_checkpoints,
)
from codetune.storage import atomic_write
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
        self.resumed_step: int | None = None
        """The step of the checkpoint this run resumed from (None: a new run)."""
        self._earlier_metrics: tuple[list[str], list[dict[str, str]]] | None = None
        self._log_version: int | None = None  # the version folder a resumed run continues in
        self._argv = [str(a) for a in args] if isinstance(args, list) else sys.argv[1:]
        try:
            self._init(args, run, **kwargs)
        except SystemExit:
            stop = self._graceful_stop()
            if stop is None or stop.signal is None:
                raise
            print(stop_report(self, stop), file=sys.stderr, flush=True)
            raise SystemExit(128 + int(stop.signal)) from None

    def _init(self, args: list[str] | None, run: bool, **kwargs: Any) -> None:
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
                # `last` is a hard link to the checkpoint written at the same step: one copy of the weights.
                "callbacks": [
                    ProgressBar(leave=True),
                    Throughput(),
                    StepStats(),
                    StopOnNonFinite(),
                    GracefulStop(),
                    AtomicCheckpoint(save_last="link"),
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
        for warning in check_recipe_values(config.as_dict(), training_memory(trainer)):
            logging.getLogger(__name__).warning(warning)
        if self.subcommand == "fit" and config.get("memory_check", True):
            check_memory(config.as_dict())
        check_recipe_for_strategy(config, self.subcommand)
        if config.get("ckpt_path") is not None:
            config["ckpt_path"] = check_ckpt_path(
                config.ckpt_path, _run_root(trainer), _checkpoint_dirpath(trainer.callbacks)
            )
            if self.subcommand == "fit" and not str(config.ckpt_path).startswith(("last", "best", "hpc")):
                self._prepare_resume(config, Path(config.ckpt_path))

    def _prepare_resume(self, config: Any, checkpoint: Path) -> None:
        """Check that the recipe resumes what the checkpoint trained, and log into the checkpoint's own run folder."""
        raw = verify_checkpoint(checkpoint)
        model = config.model.as_dict() if hasattr(config.model, "as_dict") else dict(config.model)
        check_optimizer_unchanged(raw, model, checkpoint)
        self.resumed_step = int(raw.get("global_step") or 0)
        version = _version_folder(config.trainer, checkpoint, self._default_logger)
        if version is None:
            return
        # The resumed run continues the interrupted one in its folder: one metrics.csv (rows past the checkpoint,
        # which this run trains again, dropped), config.yaml of this run, the earlier one kept beside it.
        if self._default_logger:
            self._log_version = int(version.name[8:])
        else:
            logger = config.trainer.logger
            logger["init_args"] = {**_plain(logger.get("init_args") or {}), "version": int(version.name[8:])}
        earlier = version / "config.yaml"
        if earlier.is_file():
            shutil.copy2(earlier, version / f"config.until-step-{self.resumed_step}.yaml")
            self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": True}
        self._earlier_metrics = metrics_until(version / "metrics.csv", self.resumed_step)

    def _keep_earlier_metrics(self) -> None:
        # Lightning's CSV writer deletes the metrics.csv it finds when it starts; the rows up to the resumed step
        # are put back, and the writer told their columns, so it appends to them.
        logger = self.trainer.logger
        if (
            self._earlier_metrics is None
            or not isinstance(logger, CSVLogger)
            or not self.trainer.is_global_zero
        ):
            return
        fields, rows = self._earlier_metrics
        writer = logger.experiment
        write_metrics(Path(writer.metrics_file_path), fields, rows)
        writer.metrics_keys = sorted(fields)

    def _graceful_stop(self) -> GracefulStop | None:
        trainer = getattr(self, "trainer", None)
        return next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None) if trainer else None

    def instantiate_trainer(self, **kwargs: Any):
        if getattr(self, "_default_logger", False) and "logger" not in kwargs:
            kwargs["logger"] = default_loggers(self._log_root, version=self._log_version)
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
        # The check runs in before_instantiate_classes, once the logger (where `last` is looked for) is known.
        return None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--memory_check",
            type=bool,
            default=True,
            help="Before building data, refuse a run whose planned peak (codetune plan) exceeds the GPU.",
        )
        # One tokenizer for both sides: the model sizes its embeddings from the data module's tokenizer.
        parser.link_arguments(
            "data", "model.init_args.tokenizer", compute_fn=_tokenizer_of, apply_on="instantiate"
        )

    def before_fit(self) -> None:
        self._keep_earlier_metrics()
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


def default_loggers(save_dir: str, tensorboard: bool | None = None, version: int | None = None) -> list[Any]:
    """A CSV logger, and TensorBoard's (when installed) writing into the same version folder: one run, one
    directory (``metrics.csv``, ``tensorboard/`` event files); ``version``: that folder (a resumed run's), else the
    next free one."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv = CSVLogger(save_dir=save_dir, version=version)
    if not (tensorboard_installed() if tensorboard is None else tensorboard):
        return [csv]
    return [
        csv,
        TensorBoardLogger(save_dir=save_dir, name=csv.name, version=csv.version, sub_dir="tensorboard"),
    ]


def training_memory(trainer: Any) -> int | None:
    """Bytes a run can hold its model in: the GPUs' memory (all of them, as FSDP2 shards across them) or, on
    the CPU, the machine's RAM; None where unknown."""
    import torch

    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator != "cpu" and torch.cuda.is_available():
        devices = trainer.get("devices", "auto")
        count = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) else 0
        count = count if count > 0 else torch.cuda.device_count()
        return torch.cuda.get_device_properties(0).total_memory * count * int(trainer.get("num_nodes") or 1)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


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


def gpu_memory() -> tuple[int | None, int]:
    """(bytes of the first visible GPU, how many are visible); (None, 0) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None, 0
    return torch.cuda.get_device_properties(0).total_memory, torch.cuda.device_count()


def check_memory(config: dict[str, Any]) -> None:
    """On a GPU machine, stop before any data is built when the recipe's planned peak exceeds the GPU."""
    accelerator = str((config.get("trainer") or {}).get("accelerator") or "auto")
    if accelerator == "cpu":
        return
    device_bytes, visible = gpu_memory()
    try:
        check_fits(config, device_bytes, visible)
    except NoModelConfig as error:  # the planner found no config: say so, never block the run
        logging.getLogger(__name__).warning("memory check skipped: %s", error)


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


def check_ckpt_path(ckpt_path: Any, root: str | Path | None = None, dirpath: str | Path | None = None) -> Any:
    """``--ckpt_path`` must exist (``best``/``hpc`` are resolved by Lightning; ``last`` before any run is not an
    error, so a resume command can be used from the start), be readable and match its checksums. ``last`` is
    resolved here, as Lightning would (the newest ``last`` of the runs under ``root``, or in ``dirpath``), so a
    torn or corrupted one is reported before the data is built, with the newest checkpoint that is intact. A run
    directory stands for its newest ``last.ckpt``, as for ``codetune export`` and ``eval``; returns the
    checkpoint to use."""
    given = ckpt_path
    if str(ckpt_path) == "last" and root is not None:
        folders = [Path(dirpath)] if dirpath else {p.parent for p in run_checkpoints(root)}
        found = [p for folder in folders for p in last_checkpoints(folder) if p.exists()]
        if not found:
            return ckpt_path  # nothing to resume: Lightning starts afresh (and says so)
        ckpt_path = max(found, key=lambda p: p.stat().st_mtime)
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
    try:
        if not intact(location.path):
            size = location.path.stat().st_size if location.path.is_file() else None
            what = (
                "it is empty" if size == 0 else "cut off, or no checkpoint: it has no end-of-archive record"
            )
            raise ValueError(f"--ckpt_path {given}: {location.path}: not a readable checkpoint ({what})")
        checkpoint_shapes(location.path)  # readable at all? (memory-mapped / index only: cheap)
        verify_checkpoint(
            location.path
        )  # its checksums (reads the tensors once; the resume then finds them cached)
    except ValueError as err:
        alternative = newest_intact(
            [p for p in run_checkpoints(root or location.path.parent) if not _same(p, location.path)]
        )
        offer = (
            f"; the newest intact checkpoint of this run is {alternative}: resume with --ckpt_path {alternative}"
            if alternative is not None
            else "; no other checkpoint of this run is left: start again without --ckpt_path"
        )
        raise ValueError(f"{str(err).rstrip('.')}{offer}") from None
    return str(location.path)


def check_optimizer_unchanged(raw: dict[str, Any], model: dict[str, Any], where: str | Path) -> None:
    """Refuse a resume whose recipe changed the optimizer's or the schedule's settings.

    Resuming restores the checkpoint's optimizer and scheduler states, learning rates included, so a changed
    ``lr`` (or ``weight_decay``, ``warmup_steps``, ...) would be recorded in ``config.yaml`` and not be used.
    """
    init = model.get("init_args") or {}
    saved_spec = (raw.get("hyper_parameters") or {}).get("model") or {}
    spec = init.get("model") or {}
    if saved_spec.get("config") != spec.get("config") or (
        absolute_base(saved_spec.get("name_or_path")) != absolute_base(spec.get("name_or_path"))
    ):
        return  # another model: the shape check when it loads says so, which is the first thing to fix
    changed: list[str] = []
    groups = [g for state in raw.get("optimizer_states") or [] for g in state.get("param_groups", [])]
    optimizer = (
        (init.get("optimizer") or {}).get("init_args") if isinstance(init.get("optimizer"), dict) else None
    )
    if groups and optimizer:
        first = groups[0]  # the decayed group: the recipe's weight_decay applies to it
        for key, value in optimizer.items():
            saved = first.get("initial_lr", first.get("lr")) if key == "lr" else first.get(key)
            if saved is not None and value is not None and not _same_value(saved, value):
                changed.append(f"optimizer {key} {_show(saved)} -> {_show(value)}")
    schedulers = raw.get("lr_schedulers") or []
    scheduler = (
        (init.get("scheduler") or {}).get("init_args") if isinstance(init.get("scheduler"), dict) else None
    )
    if schedulers and scheduler:
        for key, value in scheduler.items():
            saved = schedulers[0].get(key)
            if saved is not None and value is not None and not _same_value(saved, value):
                changed.append(f"scheduler {key} {_show(saved)} -> {_show(value)}")
    if changed:
        raise ValueError(
            f"--ckpt_path {where}: the recipe changed what the run trained with ({'; '.join(changed)}); a resume "
            "restores the checkpoint's optimizer and schedule, so the new values would be recorded but not used. "
            "Resume with the values it trained with, or start a new run from these weights with "
            f"--model.init_args.model.name_or_path={where}"
        )


def metrics_until(metrics: Path, step: int) -> tuple[list[str], list[dict[str, str]]] | None:
    """The columns and the rows up to ``step`` of a run's ``metrics.csv`` (a resumed run logs the later steps
    again); None when there is none."""
    if not metrics.is_file():
        return None
    with open(metrics, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields, rows = list(reader.fieldnames or []), list(reader)
    return fields, [r for r in rows if not r.get("step") or int(float(r["step"])) <= step]


def write_metrics(metrics: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=sorted(fields))  # "\r\n" rows, as Lightning writes them
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(metrics, out.getvalue())


def stop_report(cli: CodetuneCLI, stop: GracefulStop) -> str:
    """What an interrupted fit prints: what stopped it, what was saved, and the command that resumes it."""
    name = (
        "SIGTERM" if stop.signal == 15 else "Ctrl-C (SIGINT)" if stop.signal == 2 else f"signal {stop.signal}"
    )
    callback = cli.trainer.checkpoint_callback
    newest = stop.saved or (getattr(callback, "last_model_path", None) or None)
    if newest and not Path(newest).exists():
        newest = None
    where = f"at step {stop.step}" if stop.step is not None else "before training"
    if stop.saved:
        saved = f"saved {stop.saved} (step {stop.step})"
    elif newest:
        saved = f"nothing new saved (not between two steps, or saved already); newest checkpoint: {newest}"
    else:
        saved = "no checkpoint written yet"
    line = f"codetune fit: stopped by {name} {where}; {saved}."
    if newest:
        args = _without_ckpt_path(cli._argv)
        line += f"\nResume with:\n  codetune {shlex.join([*args, '--ckpt_path', str(newest)])}"
    else:
        line += " Run the same command again to start over."
    return line


def _without_ckpt_path(args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            out.append(arg)
    return out


def _run_root(trainer: Any) -> Path:
    """Where a recipe's runs are logged: the logger's ``save_dir``, else ``trainer.default_root_dir``."""
    logger = trainer.get("logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    save_dir = init.get("save_dir") if hasattr(init, "get") else None
    return Path(save_dir or trainer.get("default_root_dir") or "runs").expanduser()


def _checkpoint_dirpath(callbacks: Any) -> str | None:
    for callback in callbacks or []:
        init = callback.get("init_args") if hasattr(callback, "get") else None
        if str(callback.get("class_path", "")).endswith(("ModelCheckpoint", "AtomicCheckpoint")) and init:
            if init.get("dirpath"):
                return str(init["dirpath"])
    return None


def _version_folder(trainer: Any, checkpoint: Path, default_logger: bool = False) -> Path | None:
    """The ``version_N`` folder the checkpoint was written in, when this recipe's logger would log beside it
    (``default_logger``: codetune's own CSV + TensorBoard loggers, which log under ``default_root_dir``)."""
    run = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints" or not re.fullmatch(r"version_\d+", run.name):
        return None
    logger = trainer.get("logger")
    class_path = str(logger.get("class_path", "")) if hasattr(logger, "get") else ""
    if not default_logger and not class_path.endswith(("CSVLogger", "TensorBoardLogger")):
        return None
    init = (logger.get("init_args") if hasattr(logger, "get") else None) or {}
    if init.get("version") is not None:
        return None  # the recipe chose its folder
    name = init.get("name") or "lightning_logs"
    if (_run_root(trainer) / name).resolve() != run.parent.resolve():
        return None
    return run


def _plain(value: Any) -> dict[str, Any]:
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


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
