"""``codetune infill``: the middle a model writes between the code of two files, optionally with the repository's
other files as context (repository-level infilling)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Literal

from codetune.checkpoints import load_trained
from codetune.checkpoints.trained import peek_trained
from codetune.data.repository import dependency_order
from codetune.eval.infilling import RepoContext, check_format, infill_one, require_sentinels


def repository_context(
    context: list[str], edited: str, repo: str | None = None, path: str | None = None
) -> RepoContext:
    """The :class:`RepoContext` of context files given on the command line: paths relative to their git work tree
    (else to their common folder), in dependency order, the repository named after that folder unless ``repo``."""
    files = []
    for name in context:
        file = Path(name).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"--context {name}: no such file")
        files.append(file.resolve())
    root = _work_tree(files[0].parent) or Path(os.path.commonpath([f.parent for f in files]))
    relative = {}
    for file in files:
        try:
            relative[file.relative_to(root).as_posix()] = file.read_text(encoding="utf-8")
        except ValueError:
            raise ValueError(
                f"--context {file}: not inside {root}, the repository of the first context file"
            ) from None
        except UnicodeDecodeError:
            raise ValueError(f"--context {file}: not UTF-8 text") from None
    order = dependency_order(relative, repo or root.name)
    edited_path = path
    if edited_path is None:
        target = Path(edited).expanduser().resolve()
        edited_path = target.relative_to(root).as_posix() if target.is_relative_to(root) else target.name
    return RepoContext(repo or root.name, tuple((p, relative[p]) for p in order), edited_path)


def _work_tree(folder: Path) -> Path | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # no git: the common folder of the files is the repository
        return None
    return Path(done.stdout.strip()).resolve() if done.returncode == 0 else None


def infill(
    model: str,
    prefix: str,
    suffix: str,
    context: list[str] | None = None,
    repo: str | None = None,
    path: str | None = None,
    format: Literal["psm", "spm"] = "psm",
    sentinels: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    base_model: str | None = None,
) -> str:
    """Fill in the code between the contents of the ``prefix`` and ``suffix`` files; returns the middle.

    Uses the same prompt layout and stopping as the infilling eval, for a quick look at a model. With
    ``--context``, the prompt is repository-level, as repository-level FIM trains it: the context files (in
    dependency order) with their headers (the base's repository/file tokens, else ``# repo/path`` comments), then
    the edited file's header, then the FIM prompt.

    Args:
        model: Exported Hugging Face folder, training checkpoint (``.ckpt``) or run directory.
        prefix: File with the code before the gap.
        suffix: File with the code after the gap.
        context: Other files of the repository to show before the edited file (``--context a.py b.py``).
        repo: Repository name in the prompt; default: the name of the context files' git work tree (or folder).
        path: Path of the edited file in the prompt; default: the prefix file's path in that repository.
        format: FIM layout of the prompt, ``psm`` or ``spm`` (as in training).
        sentinels: FIM sentinel set (``codellama``, ``codellama-hf``, ``starcoder``); default: the one the tokenizer carries.
        max_new_tokens: Generation budget for the middle.
        temperature: Sampling temperature; 0 is greedy.
        seed: Seed of the sampling.
        base_model: Local folder or Hub id of the base model, when the one the checkpoint names has moved (as for
            ``codetune export``).
    """
    check_format(format)
    texts = []
    for name, file_name in (("prefix", prefix), ("suffix", suffix)):
        file = Path(file_name).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"--{name} {file_name}: no such file")
        texts.append(file.read_text())
    repo_context = repository_context(context, prefix, repo, path) if context else None
    # The FIM tokens are checked from the tokenizer, before the weights load (minutes for a 7B).
    require_sentinels(peek_trained(model, base_model)[0], sentinels)
    model_obj, tokenizer = load_trained(model, base_model=base_model)
    return infill_one(
        model_obj,
        tokenizer,
        *texts,
        format,
        sentinels,
        max_new_tokens,
        temperature,
        seed,
        context=repo_context,
    )
