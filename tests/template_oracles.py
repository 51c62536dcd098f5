"""The template engines editor integrations run, as test oracles: Go's text/template with Ollama's rules
(``tests/ollama_template.go``, built once with the Go toolchain) and Handlebars (Continue's engine, from npm).

Each is fetched or built into ``$CODETUNE_CACHE`` on first use; a machine without Go, node/npm or the npm
registry skips the tests that need it, saying why (Debian: ``apt-get install golang-go``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from codetune.storage import atomic_folder, cache_root

GO_SOURCE = Path(__file__).with_name("ollama_template.go")
HANDLEBARS = "4.7.10"


def render_ollama(template: str, cases: list[tuple[str, str]]) -> list[str]:
    """``template`` rendered as Ollama renders a Modelfile TEMPLATE for each (prompt, suffix) request."""
    request = {"template": template, "cases": [{"prompt": p, "suffix": s} for p, s in cases]}
    done = subprocess.run(
        [str(_go_oracle())], input=json.dumps(request), capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"Go template oracle failed: {done.stderr}")
    return json.loads(done.stdout)


def render_handlebars(template: str, values: dict[str, str]) -> str:
    """``template`` rendered by Handlebars (``Handlebars.compile(template)(values)``), as Continue renders
    ``promptTemplates.autocomplete``."""
    folder = _npm_folder("handlebars", [f"handlebars@{HANDLEBARS}"])
    script = (
        "const H = require(process.argv[1]); const r = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "process.stdout.write(JSON.stringify(H.compile(r.template)(r.values)));"
    )
    done = subprocess.run(
        ["node", "-e", script, str(folder / "node_modules" / "handlebars")],
        input=json.dumps({"template": template, "values": values}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"Handlebars failed: {done.stderr}")
    return json.loads(done.stdout)


def _go_oracle() -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip(
            "Go is not installed (Debian: apt-get install golang-go): Ollama's template rules need it"
        )
    digest = hashlib.sha256(GO_SOURCE.read_bytes()).hexdigest()[:16]
    folder = cache_root() / "ollama-template-oracle" / digest
    binary = folder / "ollama_template"
    if binary.is_file():
        return binary
    with atomic_folder(folder) as tmp:
        env = {
            **os.environ,
            "GOCACHE": str(cache_root() / "go-build"),
            "GO111MODULE": "off",
            "CGO_ENABLED": "0",
        }
        done = subprocess.run(
            [go, "build", "-o", str(tmp / "ollama_template"), str(GO_SOURCE)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"go build {GO_SOURCE.name} failed: {done.stderr}")
    return binary


def _npm_folder(name: str, packages: list[str]) -> Path:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip(f"node and npm are needed for {name}")
    folder = cache_root() / "npm" / "-".join(p.replace("/", "_").replace("@", "") for p in packages)
    if (folder / "node_modules").is_dir():
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
                "--ignore-scripts",
                *packages,
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            tail = " ".join((done.stdout + done.stderr).split()[-40:])
            pytest.skip(f"npm could not install {' '.join(packages)} (registry unreachable?): {tail}")
    return folder
