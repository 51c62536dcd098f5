"""The ``codetune`` command: recipe-driven commands go to LightningCLI, the others to plain jsonargparse functions.

``fit``, ``validate`` and ``test`` build model, data and Trainer from a YAML recipe (LightningCLI, whose
subcommands are Trainer methods). ``preview``, ``export``, ``eval`` and ``infill`` have no training recipe of
their own, so they are typed functions parsed by jsonargparse under the same entry point.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI

import codetune.model.sharding  # noqa: F401  (registers the strategy name "fsdp2" with Lightning)
from codetune.callbacks import ProgressBar, Throughput
from codetune.resume import AtomicCheckpoint, RNGState, checkpoint_shapes

RECIPE_COMMANDS = ("fit", "validate", "test")

# Attribute docstrings of recipe dataclasses (ModelSpec, FIMConfig, ...) become --help text and the reference.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class CodetuneCLI(LightningCLI):
    """LightningCLI with codetune's defaults, the tokenizer link and an end-of-run summary."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        from codetune.data.datamodule import CodeDataModule
        from codetune.modules.causal import CausalLM

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
        trainer = config.trainer
        if trainer.logger in (None, True):
            # CSV by default (no extra dependency); TensorBoard / W&B when the recipe names their logger.
            trainer.logger = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": trainer.default_root_dir or "runs"},
            }
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
            self.initial_val_loss, self.initial_val_losses = _val_loss(metrics), _val_losses(metrics)
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_started
        if self.trainer.limit_val_batches != 0:
            metrics = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self.final_val_loss, self.final_val_losses = _val_loss(metrics), _val_losses(metrics)
        run_dir = self.trainer.log_dir  # a broadcast under multi-process strategies: every rank must ask
        if self.trainer.is_global_zero:
            print_summary(self, run_dir)


_CHECKPOINT_CLASSES = {
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
}
_FSDP_STRATEGIES = ("fsdp2", "codetune.model.sharding.FSDP2Strategy", "ModelParallelStrategy")


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


def check_devices(trainer: Any) -> None:
    """Fail before anything is built when ``trainer.devices`` asks for more devices than the machine has; run
    FSDP with a single process as a plain single-device run, with a warning (sharding over one process saves
    nothing and costs the wrapping)."""
    import torch

    devices = trainer.get("devices", "auto")
    wanted = len(devices) if isinstance(devices, list) else devices
    if isinstance(wanted, str) and wanted.strip().lstrip("-").isdigit():
        wanted = int(wanted)
    accelerator = str(trainer.get("accelerator") or "auto")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in ("cpu", "gpu", "cuda", "auto") and isinstance(wanted, int) and wanted > 0:
        if on_gpu:
            available, kind = torch.cuda.device_count(), "CUDA GPU(s)"
        else:
            available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            kind = "CPU core(s) (one process per device)"
        if wanted > (available or 1):
            raise ValueError(
                f"trainer.devices={wanted} but this machine has {available} {kind}; lower trainer.devices "
                "(more machines: trainer.num_nodes, see docs/scaling.md)"
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
    from codetune.checkpoints import locate

    location = locate(ckpt_path)
    if location.kind != "checkpoint":
        raise ValueError(
            f"--ckpt_path {ckpt_path}: an exported model folder, not a training checkpoint; start from it with "
            "--model.init_args.model.name_or_path instead"
        )
    checkpoint_shapes(location.path)  # readable at all? (memory-mapped / index only: cheap)
    return str(location.path)


def _tokenizer_of(datamodule):
    return datamodule.tokenizer


def _val_loss(metrics: list[dict[str, float]]) -> float | None:
    return float(metrics[0]["val/loss"]) if metrics and "val/loss" in metrics[0] else None


def _val_losses(metrics: list[dict[str, float]]) -> dict[str, float]:
    prefix = "val/loss/"
    return {
        k[len(prefix) :]: float(v) for k, v in (metrics[0] if metrics else {}).items() if k.startswith(prefix)
    }


def checkpoint_path(trainer) -> str | None:
    """The newest checkpoint this run wrote (``last`` if kept)."""
    cb = trainer.checkpoint_callback
    if cb is None:
        return None
    return cb.last_model_path or cb.best_model_path or None


def print_summary(cli: CodetuneCLI, run_dir: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    trainer = cli.trainer
    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    table = Table(title="codetune fit: summary", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths are for copying: wrapped whole, never cut to "…"
    table.add_row("steps", str(trainer.global_step))
    table.add_row("time", f"{cli.fit_seconds:.1f} s")
    if throughput is not None and throughput.train_seconds > 0:
        table.add_row(
            "tokens trained", f"{throughput.total_real_tokens:,} real of {throughput.total_tokens:,}"
        )
        table.add_row("tokens/s", f"{throughput.total_tokens / throughput.train_seconds:,.0f}")
    if cli.initial_val_loss is not None:
        table.add_row("val loss before", f"{cli.initial_val_loss:.4f}")
    if cli.final_val_loss is not None:
        table.add_row("val loss after", f"{cli.final_val_loss:.4f}")
    # The overall loss mixes sources: instruction tuning can lower the instruction loss while the code loss rises,
    # and only the parts say which happened.
    for name, after in cli.final_val_losses.items():
        if not math.isfinite(after):  # nothing of this source in the batches validated
            continue
        before = cli.initial_val_losses.get(name)
        table.add_row(
            f"  val loss {name}", (f"{before:.4f} -> " if before is not None else "") + f"{after:.4f}"
        )
    table.add_row("checkpoint", str(checkpoint_path(trainer)))
    table.add_row("run dir", str(run_dir if run_dir is not None else trainer.log_dir))
    Console(stderr=True).print(table)


def _function_commands() -> dict[str, Callable[..., Any] | dict[str, Callable[..., Any]]]:
    """Non-recipe commands: name -> typed function, or a dict of them for sub-commands.

    jsonargparse builds each parser from the function's signature and docstring, so ``--help`` and the
    docs cannot drift from the code.
    """
    from codetune.data.preview import preview_command
    from codetune.eval.humaneval import evaluate_humaneval
    from codetune.eval.infilling import evaluate_infilling, infill
    from codetune.eval.perplexity import evaluate_perplexity
    from codetune.eval.retrieval import evaluate_retrieval
    from codetune.exporter import export

    return {
        "export": export,
        "eval": {
            "humaneval": evaluate_humaneval,
            "infilling": evaluate_infilling,
            "retrieval": evaluate_retrieval,
            "perplexity": evaluate_perplexity,
        },
        "infill": infill,
        "preview": preview_command,
    }


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = _function_commands()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: codetune {fit,validate,test," + ",".join(commands) + "} [--config recipe.yaml] [...]")
        print("  fit|validate|test   run a recipe through Lightning (see `codetune fit --help`)")
        for name, fn in commands.items():
            if isinstance(fn, dict):
                print(f"  {name:<19} {{{','.join(fn)}}} (see `codetune {name} --help`)")
            else:
                print(f"  {name:<19} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return
    command, rest = argv[0], argv[1:]
    if command not in (*RECIPE_COMMANDS, *commands):
        raise SystemExit(
            f"codetune: unknown command {command!r}; choose one of {[*RECIPE_COMMANDS, *commands]}"
        )
    try:
        if command in RECIPE_COMMANDS:
            _check_config_paths(rest)
            # Lightning starts the other processes of a multi-device run by re-running sys.argv, so it must hold
            # the whole command; LightningCLI parses it from there.
            saved_argv, sys.argv = sys.argv, [sys.argv[0], command, *rest]
            try:
                CodetuneCLI()
            finally:
                sys.argv = saved_argv
        else:
            from jsonargparse import CLI

            if command == "preview":  # jsonargparse keeps `--config` for itself; here it names the recipe
                rest = [
                    "--recipe" + a[len("--config") :] if a.split("=")[0] == "--config" else a for a in rest
                ]
            fn = commands[command]
            target = fn.get(rest[0]) if isinstance(fn, dict) and rest else fn
            if callable(target):
                rest = bare_flags_as_true(target, rest)
            _print_result(CLI(fn, args=rest, as_positional=False, prog=f"codetune {command}"))
    except (ValueError, OSError) as err:
        # Bad input (a recipe value, a path, a data file) is reported in one line; the traceback helps only
        # when the bug is ours, so it is one variable away.
        if os.environ.get("CODETUNE_DEBUG"):
            raise
        raise SystemExit(
            f"codetune {command}: error: {root_cause(err)} (CODETUNE_DEBUG=1 shows the traceback)"
        ) from None


def _print_result(result: Any) -> None:
    """What a function command answers goes to stdout (logs go to stderr): the infilled middle, eval scores."""
    if isinstance(result, str):
        print(result)
    elif isinstance(result, dict) and "scores" in result:
        print(json.dumps(result["scores"]))


def bare_flags_as_true(fn: Callable[..., Any], args: list[str]) -> list[str]:
    """Let ``--overwrite`` stand for ``--overwrite true`` for the boolean parameters of ``fn``."""
    import typing

    hints = typing.get_type_hints(fn)
    flags = {f"--{name}" for name, hint in hints.items() if hint is bool}
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        nxt = args[i + 1] if i + 1 < len(args) else None
        if arg in flags and (nxt is None or nxt.startswith("--")):
            out.append("true")
    return out


def root_cause(err: BaseException) -> str:
    """The message worth showing from an error chain, in one line.

    jsonargparse wraps a constructor's error in union/type errors, so the outermost error is rarely it. The
    outermost error that codetune itself raised is: it names the file, key or line and what to do, and the
    errors below it (a ``json`` decoder's internals, say) are what it explains. Without one, the innermost.
    """
    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    ours = [e for e in chain if _raised_by_codetune(e)]
    chosen = ours[0] if ours else chain[-1]
    return str(chosen).splitlines()[0] if str(chosen) else type(chosen).__name__


def _raised_by_codetune(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(Path(__file__).resolve().parent)


def _check_config_paths(args: list[str]) -> None:
    """Fail in one line, before anything is built, when a --config or --data file does not exist."""
    for i, arg in enumerate(args):
        for flag in ("--config", "--data"):
            value = None
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value and value.endswith((".yaml", ".yml")) and not Path(value).is_file():
                raise SystemExit(f"codetune: {flag} {value}: no such file")


if __name__ == "__main__":
    main()
