"""The house plan, computed from the source: no import cycles, and no import from a lower room to a higher one."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "codetune"

# Rooms from the bottom up; a module may import its own layer and the ones below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("storage", "errors", "seeding", "lightning_private", "llama_cpp"),
    ("data", "model"),
    ("checkpoints", "eval"),
    ("modules", "callbacks", "optim", "resume", "strategies", "exports", "selfinstruct", "planner"),
    ("commands",),
    ("cli", "api"),
]
# Within a layer, rooms that must not know each other.
APART = [("data", "model"), ("checkpoints", "eval")]


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "codetune"


def _layer(room: str) -> int:
    for i, rooms in enumerate(LAYERS):
        if room in rooms:
            return i
    raise AssertionError(f"room {room!r} is in no layer of tests/test_architecture.py; place it")


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(SRC).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """module -> codetune modules it imports (any import statement, at any depth of the file)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("codetune")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                    ).strip(".")
                if base.startswith("codetune"):
                    # `from codetune.x import y` imports module codetune.x.y when y is a module
                    for alias in node.names:
                        full = f"{base}.{alias.name}"
                        targets.add(full if full in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def function_level_imports() -> list[str]:
    """``module:line`` of every import of a codetune module that is not at a module's top level."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                )
                if any(n.startswith("codetune") for n in names):
                    found.append(f"{_module_name(path)}:{node.lineno}")
    return found


def test_no_module_imports_a_higher_room():
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if _room(module) != "codetune" and _layer(_room(target)) > _layer(_room(module))
    ]
    assert not upward, upward


def test_rooms_that_must_stay_apart_do():
    crossing = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        for a, b in APART
        if {_room(module), _room(target)} == {a, b}
    ]
    assert not crossing, crossing


def test_there_is_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package importing its own submodules (re-exports in __init__) is not a cycle of rooms.
    real = [c for c in cycles if not all(m.startswith(c[0]) or c[0].startswith(m) for m in c)]
    assert not real, real


def test_codetune_modules_are_imported_at_the_top_only():
    # Lazy imports are for heavy third-party packages (torch, transformers) only; between codetune's own rooms a
    # function-level import would only hide a cycle. The one registry that imports commands on use is allowed.
    allowed = {"codetune.commands:", "codetune.cli:", "codetune:"}
    found = [f for f in function_level_imports() if not any(f.startswith(a) for a in allowed)]
    assert not found, found


def test_the_graph_sees_a_planted_upward_import(tmp_path, monkeypatch):
    # The checks above can fail: a data module importing the training module is caught.
    planted = PACKAGE / "data" / "_planted_upward_import.py"
    planted.write_text("from codetune.modules.causal import CausalLM\n")
    try:
        graph = import_graph()
        assert "codetune.modules.causal" in graph["codetune.data._planted_upward_import"]
        with pytest.raises(AssertionError):
            test_no_module_imports_a_higher_room()
    finally:
        planted.unlink()


@pytest.mark.parametrize("name", ["codetune.lightning_private"])
def test_every_private_lightning_api_codetune_uses_still_exists(name):
    private = importlib.import_module(name)
    for function in (
        "is_local_path",
        "load_distributed_checkpoint",
        "evaluate_under_no_grad",
        "request_graceful_stop",
    ):
        assert callable(getattr(private, function)), function
    for class_path, attributes in private.OVERRIDDEN.items():
        module, _, cls_name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        for attribute in attributes:
            present = hasattr(cls, attribute)
            if not present and attribute.startswith("_last_"):  # instance attributes set in __init__
                present = hasattr(cls(), attribute)
            if not present and attribute == "received_sigterm":
                present = hasattr(cls(None), attribute)
            assert present, f"{class_path}.{attribute} is gone: update codetune for this Lightning version"
