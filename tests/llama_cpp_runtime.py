"""llama.cpp itself as a test oracle: the npm package node-llama-cpp (prebuilt CPU binaries, nothing compiled).

The first use installs ``node-llama-cpp@3.21.1`` with npm into ``$CODETUNE_CACHE/node-llama-cpp/`` (about 80 MB,
only the binary package of this platform); later uses start from there. Without node/npm, or when the npm
registry cannot be reached, the tests that need it skip and say why. :func:`run_llama_cpp` loads one GGUF file
and answers tokenization and greedy-infill questions in one process (``tests/llama_cpp_runtime.mjs``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from codetune.storage import atomic_folder, cache_root

NODE_LLAMA_CPP = "3.21.1"
SCRIPT = Path(__file__).with_name("llama_cpp_runtime.mjs")
# node-llama-cpp's prebuilt binary packages, by (system, machine).
_BINARIES = {
    ("Linux", "x86_64"): "linux-x64",
    ("Linux", "aarch64"): "linux-arm64",
    ("Darwin", "arm64"): "mac-arm64-metal",
    ("Darwin", "x86_64"): "mac-x64",
}


def runtime_dir() -> Path:
    """The folder whose ``node_modules`` holds node-llama-cpp, installed on first use; or a skip with the reason."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(
            "llama.cpp runtime unavailable: node and npm are needed for node-llama-cpp (Node.js >= 20)"
        )
    binary = _BINARIES.get((platform.system(), platform.machine()))
    if binary is None:
        pytest.skip(f"node-llama-cpp has no prebuilt binary for {platform.system()} {platform.machine()}")
    folder = cache_root() / "node-llama-cpp" / f"{NODE_LLAMA_CPP}-{binary}"
    if (folder / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        return folder
    with atomic_folder(folder) as tmp:
        done = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(tmp),
                "--save-exact",
                "--no-audit",
                "--no-fund",
                "--no-package-lock",
                "--omit=optional",
                "--ignore-scripts",
                f"node-llama-cpp@{NODE_LLAMA_CPP}",
                f"@node-llama-cpp/{binary}@{NODE_LLAMA_CPP}",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            tail = " ".join((done.stdout + done.stderr).split()[-40:])
            pytest.skip(
                f"npm could not install node-llama-cpp@{NODE_LLAMA_CPP} (registry unreachable?): {tail}"
            )
    return folder


def run_llama_cpp(
    model: Path,
    tokenize: list[str] | None = None,
    infill: list[dict[str, Any]] | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Load ``model`` in llama.cpp and answer: its FIM token ids, ``tokenize`` (special tokens parsed) and greedy
    ``infill`` jobs (``{"prefix", "suffix", "maxTokens"}``); plus ``seconds``, the wall time of the whole run."""
    folder = runtime_dir()
    request = {"model": str(model), "tokenize": tokenize or [], "infill": infill or [], "threads": threads}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(request, handle)
    try:
        started = time.perf_counter()
        done = subprocess.run(
            ["node", str(SCRIPT), handle.name],
            env={**os.environ, "NODE_LLAMA_CPP_DIR": str(folder)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        seconds = time.perf_counter() - started
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp (node-llama-cpp) failed on {model}:\n{done.stderr[-3000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    answer["seconds"] = seconds
    return answer
