"""docs/notebooks/quickstart.ipynb runs top to bottom on CPU with this venv's Python, offline."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "notebooks" / "quickstart.ipynb"
KERNEL = "codetune-test"


def test_notebook_is_committed_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # A copy of the recipes in a scratch folder: the notebook finds the repository root by looking for
    # recipes/quickstart.yaml upwards from its working directory, and writes its runs under that root.
    for folder in ("recipes", "data_modules"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    workdir = tmp_path / "docs" / "notebooks"
    workdir.mkdir(parents=True)
    # A kernel spec for exactly this interpreter (a "python3" spec found elsewhere could be another Python).
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The suite's cache, when there is one: the quickstart's tokenizer and tokenized data are then built once
    # for the session (what the notebook shows does not depend on whether they were cached).
    monkeypatch.setenv("CODETUNE_CACHE", os.environ.get("CODETUNE_CACHE") or str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, kernel_name=KERNEL, timeout=240, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    work = tmp_path / "runs" / "notebook"
    exported = work / "exported"
    assert (exported / "config.json").is_file() and (exported / "README.md").is_file()
    assert list(exported.glob("*.safetensors"))
    assert list(work.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    assert json.loads((work / "eval" / "perplexity_results.json").read_text())["perplexity"]
    printed = "".join(
        output.get("text", "") for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "val loss" in printed and "checkpoint:" in printed
