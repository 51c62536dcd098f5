"""``codetune eval TASK``: one skeleton — check the arguments, load the model, run the task, write the results.

Each task is a typed function (its signature is the ``--help`` and the notebook API's options); what it measures
lives in :mod:`codetune.eval` as library code that takes a loaded model. Every task writes the same two files:
``<task>_results.json`` (scores, settings, model, seed, sandbox) and ``<task>_samples.jsonl`` (one record per
sample), by default into the run's ``eval/<task>`` folder, where ``codetune export`` finds them for the model card.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from codetune.checkpoints import Location, load_trained, locate
from codetune.checkpoints.trained import peek_trained
from codetune.commands.preview import recipe_datamodule
from codetune.data.corpus import curated_documents
from codetune.data.git import GitRepos
from codetune.eval import humaneval as he
from codetune.eval import infilling as inf
from codetune.eval import mbpp
from codetune.eval import repository as repo_eval
from codetune.eval.perplexity import check_lengths, held_out_streams, perplexity_by_length
from codetune.eval.report import comparison_table, read_scores, run_labels, scores_of
from codetune.eval.retrieval import DEFAULT_POSITIONS, load_corpus, run_retrieval
from codetune.eval.sandbox import Sandbox, SandboxLimits
from codetune.storage import atomic_write

log = logging.getLogger(__name__)

Work = Callable[[Any, Any], tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]]
"""A task's measurement on a loaded ``(model, tokenizer)``: ``(scores, records, extra results fields)``."""


def run_task(
    name: str,
    benchmark: str,
    model: str | None,
    out_dir: str | None,
    settings: dict[str, Any],
    work: Work,
    loaded: tuple[Any, Any] | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """Load ``model`` (unless ``loaded`` is given; ``base_model`` replaces a base that moved), run ``work`` on it,
    write and return the results."""
    started = time.monotonic()
    model_obj, tokenizer = loaded if loaded is not None else load_trained(model, base_model=base_model)
    scores, records, extra = work(model_obj, tokenizer)
    results = {
        "benchmark": benchmark,
        "scores": scores,
        **({"num_tasks": len(records)} if records else {}),
        "model": model,
        "settings": settings,
        **extra,
    }
    results.setdefault("seconds", time.monotonic() - started)
    path = write_results(out_dir, name, results, records)
    for score in scores_of(results, path.name):
        tasks = "" if score.num_tasks is None else f" on {score.num_tasks} tasks"
        log.info(
            "%s %s = %.4g%s of %s; %s",
            benchmark,
            score.metric,
            score.value,
            tasks,
            score.task_set,
            score.decoding,
        )
    return results


# ---- results files ----------------------------------------------------------------------------------------


def _run_checkpoint(model: Any) -> Location | None:
    """The training checkpoint ``model`` names (in a run directory), or None for an exported folder or other input."""
    if not isinstance(model, (str, Path)):
        return None
    try:
        location = locate(model)
    except (OSError, ValueError):
        return None
    return location if location.kind == "checkpoint" and location.run_dir is not None else None


def default_out_dir(location: Location | None, name: str) -> Path:
    """Where results go when no ``out_dir`` is given: for a run's checkpoint, ``<run>/eval/<name>`` for its
    ``last`` checkpoint (where the model card looks) and ``<run>/eval/<checkpoint>/<name>`` for another one;
    else ``eval/<name>``."""
    if location is None:
        return Path("eval") / name
    folder = Path(location.run_dir) / "eval"
    return folder / name if location.path.name == "last.ckpt" else folder / location.path.stem / name


def write_results(
    out_dir: str | Path | None, name: str, results: dict[str, Any], records: list[dict[str, Any]]
) -> Path:
    """Write ``{name}_results.json`` and ``{name}_samples.jsonl`` into ``out_dir`` (``None``: see
    :func:`default_out_dir` of ``results["model"]``), each atomically; returns the results path."""
    location = _run_checkpoint(results.get("model"))
    out = default_out_dir(location, name) if out_dir is None else Path(out_dir).expanduser()
    if location is not None:
        # Which weights were scored: a run's checkpoint changes when training resumes, and the model card says so.
        results = {
            **results,
            "checkpoint": {"path": str(location.path), "mtime": location.path.stat().st_mtime},
        }
    samples = atomic_write(out / f"{name}_samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    path = atomic_write(out / f"{name}_results.json", json.dumps(results, indent=2) + "\n")
    log.info("results: %s (per sample: %s)", path, samples)
    return path


# ---- tasks ------------------------------------------------------------------------------------------------


def evaluate_humaneval(
    model: str | None = None,
    completions: str | None = None,
    n: int = 1,
    k: tuple[int, ...] = (1,),
    temperature: float | None = None,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    chat: bool = False,
    limit: int | None = None,
    out_dir: str | None = None,
    seed: int = 0,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    unsafe_no_sandbox: bool = False,
    allow_no_cgroup: bool = False,
    base_model: str | None = None,
) -> dict[str, Any]:
    """HumanEval pass@k of a model (``model``) or of completions produced elsewhere (``completions``).

    Args:
        model: Exported Hugging Face folder, training checkpoint (``.ckpt``) or run directory to generate with.
        completions: JSONL file of ``{"task_id", "completion"}`` lines to score instead of generating.
        n: Samples per task when generating.
        k: The k of pass@k to report; each must be <= n.
        temperature: Sampling temperature; default greedy for n=1 and 0.8 (Code Llama) for n>1.
        top_p: Nucleus sampling mass when sampling.
        max_new_tokens: Generation budget per completion.
        batch_size: Prompts per generation batch.
        chat: Wrap each prompt in the tokenizer's chat template (instruct models) and take the reply's code.
        limit: Only the first ``limit`` tasks (quick checks); the results record how many were run.
        out_dir: Where ``humaneval_results.json`` (and per-sample JSONL) go. Default: ``eval/humaneval`` inside the run
            when ``model`` is a codetune run or checkpoint (``codetune export`` puts them in the model card), else
            ``./eval/humaneval``.
        seed: Seed of the sampling.
        timeout: Wall-clock seconds per program in the sandbox.
        memory_mb: Memory limit per sample in the sandbox (all its processes together, and each one's address
            space), in MiB.
        workers: Parallel sandbox processes (default: one per CPU core).
        unsafe_no_sandbox: Run generated code WITHOUT confinement when the sandbox cannot be set up. Never on a
            shared machine; the results and the model card carry the warning.
        allow_no_cgroup: Accept a sandbox without a per-sample memory/pids cgroup (memory bounded per process only).
        base_model: Local folder or Hub id of the base model, when the one the checkpoint names has moved (as for
            ``codetune export``).

    Returns:
        The results dict that is also written to ``humaneval_results.json``.
    """
    ks = sorted(set(k))
    if (model is None) == (completions is None):
        raise ValueError("give exactly one of --model (generate) or --completions (score a JSONL file)")
    if not ks or min(ks) < 1:
        raise ValueError(f"--k must list values >= 1, got {list(k)}")
    if model is not None and max(ks) > n:
        raise ValueError(f"pass@{max(ks)} needs k <= n samples per task, got n={n}: raise --n or lower --k")
    _check_limit(limit)
    problems = he.load_problems()
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    sandbox = _sandbox(timeout, memory_mb, workers, unsafe_no_sandbox, allow_no_cgroup)
    settings: dict[str, Any] = {"k": ks, "timeout": timeout, "memory_mb": memory_mb, "limit": limit}
    given: dict[str, list[str]] | None = None
    if completions is not None:
        given = he.read_completions(completions, he.load_problems())
        outside = sorted(set(given) - set(problems))
        if outside:
            raise ValueError(f"{completions}: tasks {outside[:3]} are beyond --limit {limit}")
        if len(given) < len(problems):
            log.warning(
                "humaneval: %s has no completion for %d of %d tasks; scoring the rest",
                completions,
                len(problems) - len(given),
                len(problems),
            )
        problems = {t: problems[t] for t in given}
    else:
        if temperature is None:
            temperature = 0.0 if n == 1 else he.DEFAULT_SAMPLING_TEMPERATURE
        settings |= {
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "chat": chat,
        }

    def work(model_obj: Any, tokenizer: Any):
        started = time.monotonic()
        by_task = given
        if by_task is None:
            by_task = he.generate_completions(
                model_obj, tokenizer, problems, n, temperature, top_p, max_new_tokens, batch_size, chat, seed
            )
        generated = time.monotonic()
        scores, records = he.score_completions(problems, by_task, ks, sandbox)
        extra = {
            "num_tasks": len(problems),
            "num_samples": len(records),
            "completions": completions,
            "seed": seed,
            "sandbox": sandbox.report.as_dict(),
            "seconds": {"generation": generated - started, "execution": time.monotonic() - generated},
        }
        return scores, records, extra

    # Given completions need no model.
    loaded = (None, None) if given is not None else None
    return run_task(
        "humaneval", "humaneval", model, out_dir, settings, work, loaded=loaded, base_model=base_model
    )


def evaluate_infilling(
    model: str,
    mode: Literal["single-line", "multi-line", "random-span", "random-span-light"] = "single-line",
    format: Literal["psm", "spm"] = "psm",
    tasks: Literal["official", "derived", "repository"] = "official",
    data_dir: str | None = None,
    recipe: str | None = None,
    source: str | None = None,
    max_prompt_tokens: int = 2048,
    sentinels: str | None = None,
    limit: int | None = None,
    per_problem: int = 1,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    out_dir: str | None = None,
    seed: int = 0,
    timeout: float = 3.0,
    workers: int | None = None,
    unsafe_no_sandbox: bool = False,
    allow_no_cgroup: bool = False,
    base_model: str | None = None,
) -> dict[str, Any]:
    """HumanEval infilling of a model: execution pass@1 and exact match of greedy infills.

    Args:
        model: Exported Hugging Face folder, training checkpoint (``.ckpt``) or run directory.
        mode: ``single-line`` (1,033 official tasks), ``multi-line`` (5,815), ``random-span`` (1,640) or
            ``random-span-light`` (164, official only).
        format: FIM layout of the prompt, ``psm`` or ``spm`` (as in training).
        tasks: ``official``: the published task sets of Bavarian et al. 2022 (the papers' numbers);
            ``derived``: one task per HumanEval problem cut from its canonical solution (no download, quick);
            ``repository``: gaps cut from the held-out files of ``--recipe``'s git source (``single-line`` or
            ``multi-line``), prompted with and without repository context, scored by exact match (nothing run).
        recipe: With ``--tasks repository``: the training recipe whose data (sources, curation, split) decides
            the held-out files, so nothing scored was trained on.
        source: Name of the recipe's source to score (default: its git source).
        max_prompt_tokens: With ``--tasks repository``: budget of a prompt; context files that do not fit are
            left out, farthest first.
        data_dir: Folder holding the official task files (``HumanEval-SingleLineInfilling.jsonl.gz`` ...); default:
            ``$CODETUNE_BENCHMARK_DATA`` or the cache, fetched and checksum-verified on first use.
        sentinels: FIM sentinel set (``codellama``, ``codellama-hf``, ``starcoder``); default: the one the tokenizer carries.
        limit: Only the first ``limit`` tasks (official) or HumanEval problems (derived), for smoke runs.
        per_problem: Derived tasks per problem (distinct gaps).
        max_new_tokens: Generation budget per infill.
        batch_size: Prompts per generation batch.
        out_dir: Where ``infilling_results.json`` (and per-sample JSONL) go. Default: ``eval/infilling`` inside the run
            when ``model`` is a codetune run or checkpoint (``codetune export`` puts them in the model card), else
            ``./eval/infilling``.
        seed: Seed of the task derivation (derived tasks).
        timeout: Wall-clock seconds per program in the sandbox.
        workers: Parallel sandbox processes (default: one per CPU core).
        unsafe_no_sandbox: Run generated code WITHOUT confinement when the sandbox cannot be set up. Never on a
            shared machine; the results and the model card carry the warning.
        allow_no_cgroup: Accept a sandbox without a per-sample memory/pids cgroup (memory bounded per process only).
        base_model: Local folder or Hub id of the base model, when the one the checkpoint names has moved (as for
            ``codetune export``).
    """
    inf.check_format(format)
    _check_limit(limit)
    if tasks == "repository" or recipe is not None:
        return _repository_infilling(
            model, mode, format, recipe, source, max_prompt_tokens, sentinels, limit, per_problem,
            max_new_tokens, batch_size, out_dir, seed, base_model,
        )  # fmt: skip
    selected, task_meta = inf.select_tasks(tasks, mode, data_dir, limit, seed=seed, per_problem=per_problem)
    # A model without FIM tokens is refused from its tokenizer, before the weights load (minutes for a 7B).
    inf.require_sentinels(peek_trained(model, base_model)[0], sentinels)
    sandbox = _sandbox(timeout, None, workers, unsafe_no_sandbox, allow_no_cgroup)
    settings: dict[str, Any] = {
        "tasks": tasks,
        "mode": mode,
        "format": format,
        "limit": limit,
        "per_problem": per_problem,
        "max_new_tokens": max_new_tokens,
        "timeout": timeout,
    }

    def work(model_obj: Any, tokenizer: Any):
        scores, records, meta = inf.run_infilling(
            model_obj, tokenizer, selected, format, sentinels, max_new_tokens, batch_size, seed, sandbox,
            task_meta,
        )  # fmt: skip
        settings["sentinels"] = meta["sentinels"]
        extra = {"seed": seed, "task_set": meta.get("task_set"), "sandbox": sandbox.report.as_dict()}
        return scores, records, extra

    benchmark = f"humaneval-infilling-{mode}" + ("" if tasks == "official" else "-derived")
    return run_task("infilling", benchmark, model, out_dir, settings, work, base_model=base_model)


def recipe_files(recipe: str | None, source: str | None, overrides: list[str] | None = None) -> list[Any]:
    """The curated file documents of a recipe's repository source, each with its ``split`` side (as training made
    it: the same sources, curation and split), for scoring held-out files."""
    if recipe is None:
        raise ValueError(
            "--tasks repository / held-out files need --recipe (the training recipe of the model)"
        )
    datamodule = recipe_datamodule(recipe, list(overrides or []))
    names = [s.name for s in datamodule.sources]
    if source is None:
        gits = [s.name for s in datamodule.sources if isinstance(s, GitRepos)]
        if not gits:
            raise ValueError(
                f"--recipe {recipe}: no git source (codetune.data.git.GitRepos); give --source, one of {names}"
            )
        source = gits[0]
    if source not in names:
        raise ValueError(f"--source {source!r}: the recipe's sources are {names}")
    documents, _ = curated_documents(datamodule.sources, datamodule.curation, datamodule.split)
    return [d for d in documents if d.source == source]


def _repository_infilling(
    model: str, mode: str, format: str, recipe: str | None, source: str | None, max_prompt_tokens: int,
    sentinels: str | None, limit: int | None, per_file: int, max_new_tokens: int, batch_size: int,
    out_dir: str | None, seed: int, base_model: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    held = repo_eval.held_out_files(recipe_files(recipe, source))
    selected = repo_eval.infill_tasks(held, mode, per_file, seed)[:limit]
    settings = {
        "tasks": "repository", "mode": mode, "format": format, "recipe": recipe, "source": source,
        "held_out_files": len(held), "limit": limit, "per_file": per_file, "max_new_tokens": max_new_tokens,
        "max_prompt_tokens": max_prompt_tokens,
    }  # fmt: skip

    def work(model_obj: Any, tokenizer: Any):
        scores, records = repo_eval.run_repository_infilling(
            model_obj, tokenizer, selected, format, sentinels, max_new_tokens, batch_size, max_prompt_tokens
        )
        print(
            f"{len(records)} gaps in {len(held)} held-out files: exact match {scores['exact_match']:.3f} with "
            f"repository context, {scores['exact_match_without_context']:.3f} without"
        )
        return (
            scores,
            records,
            {"seed": seed, "task_set": {"name": f"repository-{mode}", "num_tasks": len(records)}},
        )

    return run_task(
        "infilling", f"repository-infilling-{mode}", model, out_dir, settings, work, base_model=base_model
    )


def evaluate_mbpp(
    model: str,
    variant: Literal["sanitized", "full"] = "sanitized",
    data_dir: str | None = None,
    n: int = 1,
    k: tuple[int, ...] = (1,),
    temperature: float | None = None,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    chat: bool = False,
    limit: int | None = None,
    out_dir: str | None = None,
    seed: int = 0,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    unsafe_no_sandbox: bool = False,
    allow_no_cgroup: bool = False,
    base_model: str | None = None,
) -> dict[str, Any]:
    """MBPP pass@k (Austin et al. 2021) with the 3-shot prompt Code Llama reports, on the evaluation split only.

    Args:
        model: Exported Hugging Face folder, training checkpoint (``.ckpt``) or run directory.
        variant: ``sanitized`` (427 hand-verified problems, 257 scored) or ``full`` (974; task ids 11-510 scored).
        data_dir: Folder holding ``sanitized-mbpp.json`` / ``mbpp.jsonl``; default: ``$CODETUNE_BENCHMARK_DATA`` or
            the cache, fetched and checksum-verified on first use.
        n: Samples per problem.
        k: The k of pass@k to report; each must be <= n.
        temperature: Sampling temperature; default greedy for n=1 and 0.8 for n>1.
        top_p: Nucleus sampling mass when sampling.
        max_new_tokens: Generation budget per completion.
        batch_size: Prompts per generation batch.
        chat: Ask in the tokenizer's chat template (zero-shot, instruct models) instead of the 3-shot prompt.
        limit: Only the first ``limit`` scored problems.
        out_dir: Where ``mbpp_results.json`` (and per-sample JSONL) go. Default: ``eval/mbpp`` inside the run.
        seed: Seed of the sampling.
        timeout: Wall-clock seconds per program in the sandbox.
        memory_mb: Memory limit per sample in the sandbox, in MiB.
        workers: Parallel sandbox processes (default: one per CPU core).
        unsafe_no_sandbox: Run generated code WITHOUT confinement when the sandbox cannot be set up. Never on a
            shared machine; the results and the model card carry the warning.
        allow_no_cgroup: Accept a sandbox without a per-sample memory/pids cgroup (memory bounded per process only).
        base_model: Local folder or Hub id of the base model, when the one the checkpoint names has moved (as for
            ``codetune export``).
    """
    ks = sorted(set(k))
    if not ks or min(ks) < 1 or max(ks) > n:
        raise ValueError(f"--k must list values in [1, n={n}], got {list(k)}: raise --n or lower --k")
    _check_limit(limit)
    problems, task_meta = mbpp.select_problems(variant, data_dir, limit)
    sandbox = _sandbox(timeout, memory_mb, workers, unsafe_no_sandbox, allow_no_cgroup)
    settings: dict[str, Any] = {
        "variant": variant,
        "n": n,
        "k": ks,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "chat": chat,
        "limit": limit,
        "timeout": timeout,
    }

    def work(model_obj: Any, tokenizer: Any):
        scores, records, meta = mbpp.run_mbpp(
            model_obj, tokenizer, problems, n, ks, temperature, top_p, max_new_tokens, batch_size, seed, chat,
            sandbox, task_meta,
        )  # fmt: skip
        extra = {"seed": seed, "task_set": meta.get("task_set"), "sandbox": sandbox.report.as_dict()}
        return scores, records, extra

    return run_task("mbpp", f"mbpp-{variant}", model, out_dir, settings, work, base_model=base_model)


def evaluate_retrieval(
    model: str,
    lengths: tuple[int, ...] | None = None,
    positions: tuple[float, ...] = DEFAULT_POSITIONS,
    samples: int = 2,
    corpus: str = "@stdlib",
    max_new_tokens: int = 4,
    batch_size: int = 1,
    out_dir: str | None = None,
    seed: int = 0,
    base_model: str | None = None,
) -> dict[str, Any]:
    """Key-retrieval accuracy of a model per (context length, relative position), greedy decoding.

    Args:
        model: Exported Hugging Face folder, training checkpoint (``.ckpt``) or run directory.
        lengths: Prompt lengths in tokens, each within the model's context; default: those of 1024, 2048, 4096
            that fit it (a longer prompt scores positions the model never saw).
        positions: Relative positions of the key function in the context, each in [0, 1].
        samples: Prompts per (length, position), each with its own value and context.
        corpus: Folder of code for the context, or ``@stdlib``.
        max_new_tokens: Tokens to generate for the answer.
        batch_size: Prompts per generation batch (long prompts: keep small).
        out_dir: Where ``retrieval_results.json`` (and per-sample JSONL) go. Default: ``eval/retrieval`` inside the run
            when ``model`` is a codetune run or checkpoint (``codetune export`` puts them in the model card), else
            ``./eval/retrieval``.
        seed: Seed of the values and contexts.
        base_model: Local folder or Hub id of the base model, when the one the checkpoint names has moved (as for
            ``codetune export``).
    """
    if not positions or not all(0.0 <= p <= 1.0 for p in positions):
        raise ValueError(f"--positions must lie in [0, 1], got {list(positions)}")
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if lengths is not None and (not lengths or min(lengths) < 1):
        raise ValueError(f"--lengths must be positive token counts, got {list(lengths)}")
    # Against the model's context, read from its config before the weights load.
    lengths = retrieval_lengths(lengths, peek_trained(model, base_model)[1])
    texts = load_corpus(corpus)
    settings = {
        "lengths": list(lengths),
        "positions": list(positions),
        "samples": samples,
        "corpus": corpus,
        "max_new_tokens": max_new_tokens,
    }

    def work(model_obj: Any, tokenizer: Any):
        scores, records = run_retrieval(
            model_obj, tokenizer, texts, lengths, positions, samples, max_new_tokens, batch_size, seed
        )
        return scores, records, {"seed": seed}

    return run_task("retrieval", "key-retrieval", model, out_dir, settings, work, base_model=base_model)


def evaluate_perplexity(
    model: str,
    lengths: list[int] = [1024, 2048, 4096],  # noqa: B006 - jsonargparse reads the default from here
    corpus: str = "@stdlib",
    include: list[str] | None = None,
    source_name: str = "stdlib",
    held_out_fraction: float = 0.05,
    split_seed: int = 0,
    max_tokens: int | None = 200_000,
    batch_tokens: int = 8192,
    out_dir: str | None = None,
    recipe: str | None = None,
    source: str | None = None,
    base_model: str | None = None,
) -> dict:
    """Perplexity of a model on held-out code at several context lengths.

    With ``--recipe``: the held-out files of the recipe's git source instead (its own split), each scored at every
    length with and without its repository context (the files before it in dependency order), the same code
    tokens both times.

    Args:
        model: Exported Hugging Face folder, training checkpoint (``.ckpt``) or run directory.
        lengths: Context lengths in tokens, e.g. ``[1024, 2048, 4096]``.
        corpus: Folder of code files (``@stdlib``: the Python standard library).
        include: Globs of files to read (default ``**/*.py``).
        source_name: The ``name`` the recipe gave this source; the train/validation split hashes it, so it must
            match for the held-out files to be the ones the model never trained on.
        held_out_fraction: Score only files on the validation side of the split the data module made with this
            fraction (the recipe's ``data.split.val_fraction``), so training files are not scored.
        split_seed: The recipe's ``data.split.seed``. The defaults of these three match
            ``data_modules/stdlib.yaml``, the quickstart's data.
        max_tokens: Score at most this many tokens of text.
        batch_tokens: Tokens per forward pass.
        out_dir: Where ``perplexity_results.json`` (and per-sample JSONL) go. Default: ``eval/perplexity`` inside the run
            when ``model`` is a codetune run or checkpoint (``codetune export`` puts them in the model card), else
            ``./eval/perplexity``.
        recipe: The training recipe whose git source's held-out files to score with and without repository
            context (then ``corpus``, ``include`` and the split options are the recipe's).
        source: Name of the recipe's source to score (default: its git source).
        base_model: Local folder or Hub id of the base model, when the one the checkpoint names has moved (as for
            ``codetune export``).
    """
    lengths = check_lengths(lengths)
    if recipe is not None:
        return _repository_perplexity(model, lengths, recipe, source, out_dir, base_model)
    include = include or ["**/*.py"]
    settings = {
        "corpus": corpus,
        "include": include,
        "source_name": source_name,
        "held_out_fraction": held_out_fraction,
        "split_seed": split_seed,
        "max_tokens": max_tokens,
    }

    def work(model_obj: Any, tokenizer: Any):
        streams = held_out_streams(tokenizer, corpus, include, source_name, held_out_fraction, split_seed)
        report = perplexity_by_length(
            model_obj, streams, lengths, batch_tokens=batch_tokens, max_tokens=max_tokens
        )
        for length in report.perplexity:
            print(
                f"length {length:>6}: perplexity {report.perplexity[length]:.3f} over "
                f"{report.tokens[length]:,} tokens"
            )
        extra = {
            "perplexity": {str(k): v for k, v in report.perplexity.items()},
            "tokens": {str(k): v for k, v in report.tokens.items()},
        }
        return {f"perplexity@{k}": v for k, v in report.perplexity.items()}, [], extra

    return run_task("perplexity", "perplexity", model, out_dir, settings, work, base_model=base_model)


def eval_report(runs: list[str], out: str | None = None, overwrite: bool = False) -> str:
    """A table of several runs' scores side by side (Markdown): one row per benchmark, task set, decoding and metric.

    Args:
        runs: Run directories, exported model folders or ``*_results.json`` files, one column each
            (``codetune eval report RUN RUN ...``).
        out: Also write the table to this Markdown file.
        overwrite: Replace ``out`` if it exists.

    Returns:
        The table, one Markdown line per row.
    """
    if not runs:
        raise ValueError("eval report: name at least one run directory or results file")
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
    columns = {label: read_scores(path) for label, path in run_labels(runs).items()}
    empty = [label for label, scores in columns.items() if not scores]
    if len(empty) == len(columns):
        raise ValueError(
            f"eval report: no *_results.json with scores under {', '.join(runs)}: run `codetune eval` first"
        )
    for label in empty:
        log.warning("eval report: %s has no scores (no *_results.json below it)", label)
    table = "\n".join(comparison_table(columns))
    if out is not None:
        atomic_write(Path(out), table + "\n")
    return table


eval_report.positional = "runs"  # `codetune eval report RUN RUN ...`: bare arguments are the runs


def _repository_perplexity(
    model: str,
    lengths: list[int],
    recipe: str,
    source: str | None,
    out_dir: str | None,
    base_model: str | None = None,
) -> dict[str, Any]:
    held = repo_eval.held_out_files(recipe_files(recipe, source))
    settings = {"recipe": recipe, "source": source, "lengths": lengths, "held_out_files": len(held)}

    def work(model_obj: Any, tokenizer: Any):
        scores: dict[str, float] = {}
        extra: dict[str, Any] = {"repository_context": {}}
        for length in lengths:
            r = repo_eval.context_perplexity(model_obj, tokenizer, held, length)
            print(
                f"length {length:>6}: perplexity {r.with_context:.3f} with repository context, "
                f"{r.without_context:.3f} without ({r.tokens:,} code tokens of {r.files} held-out files; "
                f"{r.context_files:.1f} context files, {r.context_tokens:.0f} tokens of context on average)"
            )
            scores[f"perplexity@{length}_with_context"] = r.with_context
            scores[f"perplexity@{length}_without_context"] = r.without_context
            extra["repository_context"][str(length)] = asdict(r)
        return scores, [], extra

    return run_task(
        "perplexity", "repository-perplexity", model, out_dir, settings, work, base_model=base_model
    )


TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "humaneval": evaluate_humaneval,
    "infilling": evaluate_infilling,
    "mbpp": evaluate_mbpp,
    "retrieval": evaluate_retrieval,
    "perplexity": evaluate_perplexity,
}
"""The measurements: ``codetune eval TASK`` and ``codetune.evaluate(TASK)``."""

EVAL_COMMANDS: dict[str, Callable[..., Any]] = {**TASKS, "report": eval_report}
"""``codetune eval`` sub-commands: the tasks, and ``report`` over their results."""


def _sandbox(
    timeout: float, memory_mb: int | None, workers: int | None, unsafe_no_sandbox: bool, allow_no_cgroup: bool
) -> Sandbox:
    """The sandbox a task executes generated code in; it refuses (fails closed) before any model is loaded."""
    limits = SandboxLimits(timeout=timeout) if memory_mb is None else SandboxLimits(timeout, memory_mb)
    return Sandbox(limits, workers, unsafe_no_sandbox=unsafe_no_sandbox, allow_no_cgroup=allow_no_cgroup)


DEFAULT_RETRIEVAL_LENGTHS = (1024, 2048, 4096)


def retrieval_lengths(lengths: tuple[int, ...] | None, context: int | None) -> tuple[int, ...]:
    """The prompt lengths to score: the given ones, each within the model's ``context`` (an error otherwise), or
    the defaults that fit it (with a note for those left out)."""
    if lengths is not None:
        too_long = [n for n in lengths if context is not None and n > context]
        if too_long:
            raise ValueError(
                f"--lengths {too_long} exceed the model's context of {context} positions: those prompts would "
                f"test positions it never trained on; pass lengths up to {context}"
            )
        return tuple(lengths)
    if context is None:
        return DEFAULT_RETRIEVAL_LENGTHS
    fitting = tuple(n for n in DEFAULT_RETRIEVAL_LENGTHS if n <= context)
    if not fitting:
        raise ValueError(
            f"the model's context is {context} positions, shorter than every default retrieval length "
            f"{list(DEFAULT_RETRIEVAL_LENGTHS)}; pass --lengths up to {context}"
        )
    if len(fitting) < len(DEFAULT_RETRIEVAL_LENGTHS):
        log.warning("retrieval: scoring lengths %s, within the model's context of %d", list(fitting), context)
    return fitting


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
