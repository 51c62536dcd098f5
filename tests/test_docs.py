"""The generated references are fresh and complete, and the docs' links lead somewhere."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GENERATED = {"recipe-reference.md": "gen_recipe_reference.py", "cli.md": "gen_cli_reference.py"}


def _sections(markdown: str) -> dict[str, str]:
    """Heading text -> the body under it (up to the next heading of any level)."""
    parts = re.split(r"^#{1,6} (.+)$", markdown, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _rows(body: str) -> dict[str, list[str]]:
    """Table rows of a section: key -> [type, default, description] (cells split on unescaped pipes)."""
    rows = {}
    for line in body.splitlines():
        match = re.match(r"^\| `([^`]+)` \|", line)
        if match:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[2:-1]]
            rows[match.group(1)] = cells
    return rows


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(GENERATED))
def test_generated_reference_is_fresh(page):
    # A fresh process: jsonargparse's parsing settings and the set of imported subclasses (which `--help` lists)
    # must be those of a plain run of the generator.
    script = DOCS / GENERATED[page]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), "--check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, (
        f"docs/{page} is stale; run `python docs/{script.name}`\n{proc.stderr[-2000:]}"
    )


def _documented_classes() -> list[type]:
    """Every codetune class a recipe reaches from the stage modules and the data module, found from the type
    hints alone (an oracle independent of jsonargparse, which the generator walks)."""
    from codetune import modules
    from codetune.data.datamodule import CodeDataModule

    todo = [getattr(modules, name) for name in modules.__all__] + [CodeDataModule]
    seen: list[type] = []
    while todo:
        cls = todo.pop(0)
        if cls in seen:
            continue
        seen.append(cls)
        for hint in _hints(cls).values():
            todo += [c for c in _classes_in(hint) if c not in seen]
    return seen


def _hints(cls: type) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls if dataclasses.is_dataclass(cls) else cls.__init__)
    return {name: hints.get(name) for name in _parameters(cls)}


def _parameters(cls: type) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]  # init=False fields are no recipe keys
    return [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _classes_in(hint: typing.Any) -> list[type]:
    found = [hint] if inspect.isclass(hint) and hint.__module__.startswith("codetune.") else []
    for arg in typing.get_args(hint):
        found += _classes_in(arg)
    return found


def _section_for(sections: dict[str, str], cls: type) -> str:
    for title, body in sections.items():
        if title == cls.__name__ or title.endswith("." + cls.__name__):
            return body
    raise AssertionError(f"recipe-reference.md has no section for {cls.__module__}.{cls.__name__}")


def test_recipe_reference_lists_every_key_of_every_recipe_class():
    sections = _sections((DOCS / "recipe-reference.md").read_text(encoding="utf-8"))
    classes = _documented_classes()
    names = {c.__name__ for c in classes}
    assert {"ModelSpec", "Adapter", "Quantization", "RopeScaling", "TokenizerSpec", "FIMConfig"} <= names
    for cls in classes:
        assert list(_rows(_section_for(sections, cls))) == _parameters(cls), cls.__name__


def test_recipe_reference_states_scalar_defaults_as_the_code_has_them():
    sections = _sections((DOCS / "recipe-reference.md").read_text(encoding="utf-8"))
    checked = 0
    for cls in _documented_classes():
        if not dataclasses.is_dataclass(cls):
            continue
        rows = _rows(_section_for(sections, cls))
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            value = field.default
            if isinstance(value, bool):
                expected = f"`{str(value).lower()}`"
            elif isinstance(value, (int, float)) or (isinstance(value, str) and value):
                expected = f"`{value}`"
            elif value is None:
                expected = "`null`"
            else:
                continue
            assert rows[field.name][1] == expected, (cls.__name__, field.name)
            checked += 1
    assert checked > 50


def test_cli_reference_has_every_command_and_option():
    from codetune.commands import COMMANDS, RECIPE_COMMANDS, resolve

    sections = _sections((DOCS / "cli.md").read_text(encoding="utf-8"))
    for name in RECIPE_COMMANDS:
        assert "--trainer.max_steps" in sections[f"codetune {name}"]
    for name, target in ((name, resolve(name)) for name in COMMANDS):
        functions = target if isinstance(target, dict) else {None: target}
        for sub, function in functions.items():
            body = sections[" ".join(p for p in ("codetune", name, sub) if p)]
            for parameter in inspect.signature(function).parameters:
                assert f"--{parameter}" in body, (name, sub, parameter)


@pytest.mark.parametrize(
    "page",
    [
        "getting-started.md",
        "concepts.md",
        "troubleshooting.md",
        "comparison.md",
        "recipe-reference.md",
        "cli.md",
    ],
)
def test_relative_links_lead_to_files_and_headings(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for target in links:
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (DOCS / page).parent / path if path else DOCS / page
        assert file.exists(), f"{page}: link to {target}: no such file"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#{1,6} (.+)$", file.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{page}: link to {target}: no such heading"
