"""The ``codetune`` command: recipe-driven commands go to LightningCLI, the others to plain jsonargparse functions.

``fit``, ``validate`` and ``test`` build model, data and Trainer from a YAML recipe (LightningCLI, whose
subcommands are Trainer methods). ``preview``, ``export``, ``eval`` and ``infill`` have no training recipe of
their own, so they are typed functions parsed by jsonargparse under the same entry point.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from codetune.callbacks import Throughput

RECIPE_COMMANDS = ("fit", "validate", "test")


class CodetuneCLI(LightningCLI):
    """LightningCLI with codetune's defaults, the tokenizer link and an end-of-run summary."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        from codetune.data.datamodule import CodeDataModule
        from codetune.modules.causal import CausalLM

        self.initial_val_loss: float | None = None
        self.final_val_loss: float | None = None
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
                "callbacks": [RichProgressBar(leave=True), Throughput(), ModelCheckpoint(save_last=True)],
            },
            args=args,
            run=run,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        if trainer.logger in (None, True):
            # CSV by default (no extra dependency); TensorBoard / W&B when the recipe names their logger.
            trainer.logger = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": trainer.default_root_dir or "runs"},
            }

    def add_arguments_to_parser(self, parser) -> None:
        # One tokenizer for both sides: the model sizes its embeddings from the data module's tokenizer.
        parser.link_arguments(
            "data", "model.init_args.tokenizer", compute_fn=_tokenizer_of, apply_on="instantiate"
        )

    def before_fit(self) -> None:
        if self.trainer.limit_val_batches != 0:
            metrics = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self.initial_val_loss = _val_loss(metrics)
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_started
        if self.trainer.limit_val_batches != 0:
            self.final_val_loss = _val_loss(
                self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            )
        if self.trainer.is_global_zero:
            print_summary(self)


def _tokenizer_of(datamodule):
    return datamodule.tokenizer


def _val_loss(metrics: list[dict[str, float]]) -> float | None:
    return float(metrics[0]["val/loss"]) if metrics and "val/loss" in metrics[0] else None


def checkpoint_path(trainer) -> str | None:
    """The newest checkpoint this run wrote (``last`` if kept)."""
    cb = trainer.checkpoint_callback
    if cb is None:
        return None
    return cb.last_model_path or cb.best_model_path or None


def print_summary(cli: CodetuneCLI) -> None:
    from rich.console import Console
    from rich.table import Table

    trainer = cli.trainer
    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    table = Table(title="codetune fit: summary", show_header=False)
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
    table.add_row("checkpoint", str(checkpoint_path(trainer)))
    table.add_row("run dir", str(trainer.log_dir))
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
    from codetune.export import export

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
            sys.argv = sys.argv[
                :1
            ]  # the arguments are passed explicitly; LightningCLI warns when both are set
            CodetuneCLI(args=[command, *rest])
        else:
            from jsonargparse import CLI

            if command == "preview":  # jsonargparse keeps `--config` for itself; here it names the recipe
                rest = [
                    "--recipe" + a[len("--config") :] if a.split("=")[0] == "--config" else a for a in rest
                ]
            CLI(commands[command], args=rest, as_positional=False)
    except (ValueError, OSError) as err:
        # Bad input (a recipe value, a path, a data file) is reported in one line; the traceback helps only
        # when the bug is ours, so it is one variable away.
        if os.environ.get("CODETUNE_DEBUG"):
            raise
        raise SystemExit(
            f"codetune {command}: error: {root_cause(err)} (CODETUNE_DEBUG=1 shows the traceback)"
        ) from None


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
    """The innermost error's message: jsonargparse wraps a constructor's error in union/type errors."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return str(err).splitlines()[0] if str(err) else type(err).__name__


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
