"""The two files every eval writes: a results JSON (scores, settings, model, seed, sandbox) and per-sample JSONL."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _checkpoint_of(model: Any):
    """The training checkpoint ``model`` names (a ``Location``), or None for an exported folder or other input."""
    if not isinstance(model, (str, Path)):
        return None
    from codetune.checkpoints import locate

    try:
        location = locate(model)
    except (OSError, ValueError):
        return None
    return location if location.kind == "checkpoint" and location.run_dir is not None else None


def default_out_dir(location: Any, name: str) -> Path:
    """Where results go when no ``out_dir`` is given: for a run's checkpoint ``location`` (see
    :func:`_checkpoint_of`), ``<run>/eval/<name>`` for its ``last`` checkpoint (where the model card looks) and
    ``<run>/eval/<checkpoint>/<name>`` for another one; else ``eval/<name>``."""
    if location is None:
        return Path("eval") / name
    folder = Path(location.run_dir) / "eval"
    return folder / name if location.path.name == "last.ckpt" else folder / location.path.stem / name


def write_results(
    out_dir: str | Path | None, name: str, results: dict[str, Any], records: list[dict[str, Any]]
) -> Path:
    """Write ``{name}_results.json`` and ``{name}_samples.jsonl`` into ``out_dir`` (``None``: see
    :func:`default_out_dir` of ``results["model"]``); returns the results path.

    Each file is written to a temporary name and renamed, so a crash never leaves half a results file.
    """
    location = _checkpoint_of(results.get("model"))
    out = default_out_dir(location, name) if out_dir is None else Path(out_dir).expanduser()
    if location is not None:
        # Which weights were scored: a run's checkpoint changes when training resumes, and the model card says so.
        results = {
            **results,
            "checkpoint": {"path": str(location.path), "mtime": location.path.stat().st_mtime},
        }
    out.mkdir(parents=True, exist_ok=True)
    samples = out / f"{name}_samples.jsonl"
    tmp = samples.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, samples)
    path = out / f"{name}_results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    log.info("results: %s (per sample: %s)", path, samples)
    return path
