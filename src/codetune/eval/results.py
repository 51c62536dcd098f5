"""The two files every eval writes: a results JSON (scores, settings, model, seed, sandbox) and per-sample JSONL."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_out_dir(model: Any, name: str) -> Path:
    """``<run>/eval/<name>`` for a codetune run or checkpoint (where the model card looks), else ``eval/<name>``."""
    if isinstance(model, (str, Path)):
        from codetune.checkpoints import locate

        try:
            location = locate(model)
        except (OSError, ValueError):
            location = None
        if location is not None and location.run_dir is not None:
            return Path(location.run_dir) / "eval" / name
    return Path("eval") / name


def write_results(
    out_dir: str | Path | None, name: str, results: dict[str, Any], records: list[dict[str, Any]]
) -> Path:
    """Write ``{name}_results.json`` and ``{name}_samples.jsonl`` into ``out_dir`` (``None``: see
    :func:`default_out_dir` of ``results["model"]``); returns the results path.

    Each file is written to a temporary name and renamed, so a crash never leaves half a results file.
    """
    out = default_out_dir(results.get("model"), name) if out_dir is None else Path(out_dir).expanduser()
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
