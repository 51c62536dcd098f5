"""The published benchmark files for tests: a local folder, never the network (see codetune.eval.benchmarks).

``$CODETUNE_BENCHMARK_DATA`` when set, else ``shared/data`` beside the repository (CI's clean clone sits next
to ``shared/``). A machine with neither skips the tests that need the files, saying where it looked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from codetune.eval.benchmarks import DATA_ENV, INFILLING_FILES, MBPP_FILES

REPO = Path(__file__).resolve().parents[1]
# Read once at import, so tests that clear the variable to exercise the library's lookup still find the files.
_GIVEN = os.environ.get(DATA_ENV)


def data_dir() -> Path:
    """A folder holding every pinned benchmark file as ``<group>/<file>``, or a skip with the reason."""
    given = _GIVEN
    folder = Path(given) if given else REPO.parent / "shared" / "data"
    files = [folder / f.group / f.name for f in (*INFILLING_FILES.values(), *MBPP_FILES.values())]
    missing = [str(f.relative_to(folder)) for f in files if not f.is_file()]
    if missing:
        where = f"{DATA_ENV}={given}" if given else f"{folder} (set {DATA_ENV} to a folder with them)"
        pytest.skip(f"benchmark files {missing} not in {where}")
    return folder
