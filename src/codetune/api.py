"""Notebook entry points: the same recipes and code paths as the ``codetune`` command, returning Python objects.

Each function is a thin face over a command of :mod:`codetune.commands`, as the CLI is: ``fit`` runs the same
LightningCLI subclass, ``preview``, ``export`` and ``evaluate`` call the functions behind ``codetune
preview|export|eval`` (so they accept the same options), and ``infill`` builds its prompt and stops generation
with the code the infilling eval uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from codetune.checkpoints import load_trained
from codetune.commands.evaluate import TASKS, eval_report
from codetune.commands.export import export as export_checkpoint
from codetune.commands.fit import CodetuneCLI
from codetune.commands.plan import plan as plan_recipe
from codetune.commands.preview import preview as preview_recipe
from codetune.commands.summary import checkpoint_path
from codetune.eval.infilling import RepoContext, infill_one
from codetune.modules.causal import CausalLM
from codetune.planner import Plan


@dataclass
class FitResult:
    """What a finished ``fit`` leaves behind."""

    module: Any
    """The trained LightningModule (``module.model`` is the Hugging Face model)."""
    datamodule: Any
    """The data module, with its tokenizer (``datamodule.tokenizer``)."""
    trainer: Any
    """The Lightning Trainer that ran."""
    checkpoint: str | None
    """Path of the newest checkpoint written (``last.ckpt``), if checkpointing was on."""
    run_dir: str | None
    """The run's log directory (config.yaml, metrics.csv, checkpoints)."""
    metrics: dict[str, float]
    """Final logged metrics, plus ``val_loss_before`` / ``val_loss_after`` when validation ran."""


def fit(recipe: str | Path, overrides: list[str] | None = None) -> FitResult:
    """Train from a recipe, exactly as ``codetune fit --config RECIPE [OVERRIDES...]`` does.

    Example: ``codetune.fit("recipes/quickstart.yaml", overrides=["--trainer.max_steps=20"])``.
    """
    recipe = _existing_recipe(recipe)
    cli = CodetuneCLI(args=["fit", "--config", str(recipe), *(overrides or [])])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    if cli.initial_val_loss is not None:
        metrics["val_loss_before"] = cli.initial_val_loss
    if cli.final_val_loss is not None:
        metrics["val_loss_after"] = cli.final_val_loss
    return FitResult(
        module=cli.model,
        datamodule=cli.datamodule,
        trainer=cli.trainer,
        checkpoint=checkpoint_path(cli.trainer),
        run_dir=cli.trainer.log_dir,
        metrics=metrics,
    )


def preview(
    recipe: str | Path,
    overrides: list[str] | None = None,
    rows: int = 8,
    out: str | Path | None = None,
    split: Literal["train", "validation"] = "train",
) -> dict[str, Any]:
    """The first rows a recipe trains on, as ``codetune preview --config RECIPE`` shows them; builds no model.

    Returns ``{"rows": [...], "summary": {...}}``: each row has ``input_ids``, ``labels``, ``position_ids``,
    ``token_kind``, its decoded ``text`` and the ``documents`` it holds; the summary has the FIM/PSM/SPM rates,
    token shares per source and the real-token fraction. ``out`` also writes the rows as JSONL.
    """
    recipe = _existing_recipe(recipe)
    return preview_recipe(
        str(recipe),
        rows=rows,
        out=None if out is None else str(out),
        split=split,
        overrides=list(overrides or []),
    )


def plan(
    recipe: str | Path,
    overrides: list[str] | None = None,
    devices: int | None = None,
    model_config: dict[str, Any] | None = None,
) -> Plan:
    """The memory a recipe's training step needs per device, as ``codetune plan --config RECIPE`` prints it; loads
    no weights and builds no data. ``plan.peak`` is the planned peak in bytes, ``plan.verdicts()`` says which common
    GPUs it fits, ``plan.as_dict()`` has every part."""
    recipe = _existing_recipe(recipe)
    return plan_recipe(
        str(recipe), devices=devices, model_config=model_config, overrides=list(overrides or [])
    )


def export(checkpoint: str | Path | FitResult, out: str | Path, **options: Any) -> Path:
    """Export a checkpoint (or a ``FitResult``) as a Hugging Face folder with a model card, as ``codetune export``.

    ``options`` are ``codetune export``'s: ``dtype``, ``adapter_only``, ``push_to_hub``, ``private``,
    ``revision``, ``overwrite``, ``base_model``, ``max_shard_size``, ``license`` (see ``codetune export --help``).
    Returns the exported folder.
    """
    _check_options(export_checkpoint, options, "export", given=("ckpt_path", "out"))
    return export_checkpoint(_checkpoint_of(checkpoint, "export"), str(out), **options)


def evaluate(task: str, model: str | Path | FitResult | None = None, **options: Any) -> dict[str, Any]:
    """Run ``codetune eval TASK``: ``humaneval``, ``infilling``, ``retrieval`` or ``perplexity``.

    ``model`` is an exported folder, a checkpoint, a run directory or a ``FitResult``; ``options`` are the
    task's own (e.g. ``limit=10``, ``lengths=[256, 512]``, ``out_dir="eval"``; see ``codetune eval TASK --help``).
    Returns the results dictionary that is also written to ``out_dir``.
    """
    tasks = eval_tasks()
    if task not in tasks:
        raise ValueError(f"evaluate: unknown task {task!r}; choose one of {sorted(tasks)}")
    run = tasks[task]
    if model is not None:
        options["model"] = _checkpoint_of(model, f"evaluate({task!r})")
    _check_options(run, options, f"evaluate({task!r})")
    return run(**options)


def compare(*runs: str | Path, out: str | None = None, overwrite: bool = False) -> str:
    """``codetune eval report RUN...``: the runs' scores side by side as a Markdown table (one column per run)."""
    return eval_report([str(r) for r in runs], out=out, overwrite=overwrite)


def eval_tasks() -> dict[str, Callable[..., dict[str, Any]]]:
    """The evaluation tasks, from the same table ``codetune eval`` dispatches on."""
    return dict(TASKS)


def infill(
    model: Any,
    prefix: str,
    suffix: str,
    *,
    tokenizer: Any = None,
    format: Literal["psm", "spm"] = "psm",
    sentinels: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    context: dict[str, str] | None = None,
    repo: str = "repo",
    path: str = "file.py",
) -> str:
    """Fill in the code between ``prefix`` and ``suffix`` (strings); returns the middle.

    ``context`` (``{path: code}`` of other files of the repository, in the order to show them: dependencies first)
    makes the prompt repository-level, as ``codetune infill --context`` does: those files with their headers (the
    base's repository/file tokens, else ``# repo/path`` comments), then the header of ``path``, then the FIM prompt.

    ``model`` is a path (exported folder, checkpoint or run directory, loaded as ``codetune eval`` loads it),
    a ``FitResult``, a codetune LightningModule, a ``(model, tokenizer)`` pair, or a Hugging Face model with
    ``tokenizer=``. The prompt is laid out by the training FIM code in ``format`` (PSM or SPM) with the
    tokenizer's FIM sentinels (or ``sentinels``: ``codellama``, ``codellama-hf``, ``starcoder``), and generation stops at the
    end-of-middle sentinel, exactly as ``codetune infill`` and the infilling eval do.
    """
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise TypeError(
            "infill: prefix and suffix are the code text itself (str); for files use `codetune infill`"
        )
    hf_model, tok = _model_and_tokenizer(model, tokenizer)
    repo_context = None if context is None else RepoContext(repo, tuple(context.items()), path)
    return infill_one(
        hf_model,
        tok,
        prefix,
        suffix,
        format,
        sentinels,
        max_new_tokens,
        temperature,
        seed,
        context=repo_context,
    )


# ---- helpers ------------------------------------------------------------------------------------------------


def _existing_recipe(recipe: str | Path) -> Path:
    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(
            f"recipe {recipe} does not exist (paths are relative to the current directory)"
        )
    return path


def _checkpoint_of(source: str | Path | FitResult, what: str) -> str:
    """A path the CLI's loaders accept, from a path or a ``FitResult``."""
    if isinstance(source, FitResult):
        if source.checkpoint is None:
            raise ValueError(
                f"{what}: this fit wrote no checkpoint (trainer.enable_checkpointing is off); "
                "train with checkpointing or pass a checkpoint path"
            )
        return source.checkpoint
    if isinstance(source, (str, Path)):
        return str(source)
    raise TypeError(
        f"{what}: expected a checkpoint, run directory or exported folder path, or a FitResult; got "
        f"{type(source).__name__} (an in-memory model: save it first, or use result.checkpoint)"
    )


def _model_and_tokenizer(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """The Hugging Face model and its tokenizer, from any of the forms ``infill`` accepts."""
    if isinstance(model, (str, Path)):
        loaded, own = load_trained(model)
        return loaded, tokenizer or own
    if isinstance(model, tuple) and len(model) == 2:
        model, tokenizer = model[0], tokenizer or model[1]
    elif isinstance(model, FitResult):
        model, tokenizer = model.module.model, tokenizer or model.datamodule.tokenizer
    elif isinstance(model, CausalLM):  # the training module (or a stage)
        if model.model is None:
            raise ValueError(
                "infill: the module's model is not built yet; call module.configure_model() first"
            )
        model, tokenizer = model.model, tokenizer or model.tokenizer
    if tokenizer is None:
        raise ValueError(
            "infill: no tokenizer; pass tokenizer=..., a (model, tokenizer) pair, a FitResult or a path"
        )
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"infill: {type(model).__name__} is not a generating Hugging Face model")
    return model, tokenizer


def _check_options(
    function: Callable[..., Any], options: dict[str, Any], what: str, given: tuple[str, ...] = ()
) -> None:
    """Name an unknown option in one line, with the valid ones, before anything is loaded."""
    accepted = [name for name in inspect.signature(function).parameters if name not in given]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{what}: unknown option(s) {unknown}; valid: {accepted}")
