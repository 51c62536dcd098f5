"""Generate docs/recipe-reference.md from the typed signatures the recipe parser reads.

Every key a recipe can set comes from jsonargparse's parser for ``codetune fit`` (the ``CodetuneCLI`` parser,
its ``trainer`` arguments) and from the classes a recipe names (the stage modules, the data module, the
dataclasses they nest, and codetune's optimizers, schedules, callbacks and strategies). Types, defaults and
descriptions are what jsonargparse itself resolves, docstrings included, so the reference cannot drift from
the code as long as it is regenerated; ``tests/test_docs.py`` fails when it was not.

    python docs/gen_recipe_reference.py            # rewrite docs/recipe-reference.md
    python docs/gen_recipe_reference.py --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from generated_page import write_or_check

OUT = Path(__file__).resolve().parent / "recipe-reference.md"
REGENERATE = "python docs/gen_recipe_reference.py"

# Components a recipe names by `class_path`: (section title, where they go, modules, base class, skipped arg).
COMPONENTS = (
    ("Optimizers", "model.init_args.optimizer", ("codetune.optim",), "torch.optim.Optimizer", "params"),
    (
        "Learning-rate schedules",
        "model.init_args.scheduler",
        ("codetune.optim",),
        "torch.optim.lr_scheduler.LRScheduler",
        "optimizer",
    ),
    (
        "Callbacks",
        "trainer.callbacks",
        ("codetune.callbacks", "codetune.resume"),
        "lightning.pytorch.callbacks.Callback",
        None,
    ),
    (
        "Strategies",
        "trainer.strategy",
        ("codetune.strategies",),
        "lightning.pytorch.strategies.Strategy",
        None,
    ),
)
# Classes a module builds on first access (PEP 562 ``__getattr__``), so they are not in its namespace yet.
LAZY_CLASSES = {"codetune.optim": ("PagedAdamW8bit",)}
_UNSET = object()


@dataclasses.dataclass
class Key:
    """One row of a reference table."""

    name: str
    type: str
    default: str
    description: str


@dataclasses.dataclass
class Section:
    """One class (or the top level / the trainer) and its keys."""

    title: str
    anchor: str
    used_at: str
    summary: str
    keys: list[Key]


class _Registry:
    """The codetune classes the reference documents, with the recipe path each is first reached at."""

    def __init__(self) -> None:
        self.paths: dict[type, str] = {}
        self.queue: list[type] = []

    def add(self, cls: type, path: str) -> None:
        if cls not in self.paths:
            self.paths[cls] = path
            self.queue.append(cls)


def main(argv: list[str] | None = None) -> int:
    return write_or_check(OUT, render, REGENERATE, __doc__.splitlines()[0], argv)


def render() -> str:
    """The whole reference as markdown."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bitsandbytes' import may look for kernels on the Hub
    from jsonargparse import set_parsing_settings

    # Dataclass fields are documented by the string under each attribute; jsonargparse reads them only when asked.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    fit_parser, trainer_defaults = _fit_parser()
    registry = _Registry()
    sections = [_top_level(fit_parser), _trainer(fit_parser, trainer_defaults)]

    from codetune import modules
    from codetune.data.datamodule import CodeDataModule
    from codetune.modules.causal import CausalLM

    stages = [getattr(modules, name) for name in modules.__all__]
    for cls in [c for c in stages if issubclass(c, CausalLM)] + [CodeDataModule]:
        registry.add(cls, "model" if issubclass(cls, CausalLM) else "data")
    component_sections: list[tuple[str, str, list[type]]] = []
    for title, where, module_names, base_path, _ in COMPONENTS:
        found = _components(module_names, _import(base_path))
        component_sections.append((title, where, found))
        for cls in found:
            registry.add(cls, where)

    documented: dict[type, Section] = {}
    while registry.queue:
        cls = registry.queue.pop(0)
        documented[cls] = _class_section(cls, registry, _skip_for(cls))

    stage_classes = [c for c in documented if registry.paths[c] == "model"]
    component_classes = {c for _, _, found in component_sections for c in found}
    nested = [c for c in documented if c not in {*stage_classes, CodeDataModule, *component_classes}]
    # (heading level, a section, or a group heading with its intro) in page order
    body: list[tuple[int, Section | str]] = [(2, section) for section in sections]
    body.append(
        (
            2,
            "Model stages (`model`)\n\n`model.class_path` picks the LightningModule; all take the same "
            "`model` spec ([ModelSpec](#modelspec)).",
        )
    )
    body += [(3, documented[c]) for c in stage_classes]
    body += [(2, "Data (`data`)"), (3, documented[CodeDataModule]), (2, "Nested settings")]
    body += [(3, documented[c]) for c in nested]
    body.append((2, "Components named by `class_path`"))
    for title, where, found in component_sections:
        body.append((3, f"{title} (`{where}`)"))
        body += [(4, documented[c]) for c in found]

    lines = [
        "# Recipe reference",
        "",
        f"<!-- Generated by docs/gen_recipe_reference.py from the typed signatures; do not edit by hand. "
        f"Regenerate with `{REGENERATE}`. -->",
        "",
        "Every key a recipe (`codetune fit --config recipe.yaml`) can set, with its type, default and "
        "description, as the recipe parser reads them from the code. Keys are written in YAML as nested "
        "mappings or on the command line as dotted flags (`--model.init_args.model.adapter.r 16`). A class "
        "named by `class_path` takes its keys under `init_args`; a dataclass (e.g. `ModelSpec`) takes them "
        "directly. See [recipes.md](recipes.md) for how a recipe is composed.",
        "",
        "## Contents",
        "",
    ]
    lines += [f"- [{item.title}](#{item.anchor})" for _, item in body if isinstance(item, Section)]
    lines.append("")
    for level, item in body:
        if isinstance(item, Section):
            lines += _markdown(item, level)
        else:
            heading, _, intro = item.partition("\n\n")
            lines += [f"{'#' * level} {heading}", ""] + ([intro, ""] if intro else [])
    return "\n".join(lines).rstrip() + "\n"


# ---- sources of truth -----------------------------------------------------------------------------------------


def _fit_parser() -> tuple[Any, dict[str, Any]]:
    """The parser of ``codetune fit`` and codetune's Trainer defaults, without parsing or building anything."""
    from codetune.commands.fit import CodetuneCLI

    class _Captured(Exception):
        pass

    class _ParserOnly(CodetuneCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise _Captured(parser, self.trainer_defaults)

    try:
        _ParserOnly(args=[])
    except _Captured as captured:
        parser, defaults = captured.args
        return parser._subcommands_action.choices["fit"], defaults
    raise RuntimeError("CodetuneCLI did not reach parse_arguments")


def _class_parser(cls: type, skip: str | None) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, fail_untyped=False, skip={skip} if skip else None)
    return parser


def _components(module_names: tuple[str, ...], base: type) -> list[type]:
    """Public classes defined in ``module_names`` that subclass ``base``, in definition order."""
    found: list[type] = []
    for name in module_names:
        module = importlib.import_module(name)
        names = [n for n, v in vars(module).items() if inspect.isclass(v)] + list(LAZY_CLASSES.get(name, ()))
        for attr in names:
            value = getattr(module, attr)
            if (
                not attr.startswith("_")
                and inspect.isclass(value)
                and value.__module__ == name
                and issubclass(value, base)
                and value not in found
            ):
                found.append(value)
    return found


def _skip_for(cls: type) -> str | None:
    """The argument Lightning passes itself (an optimizer's ``params``, a schedule's ``optimizer``)."""
    for _, _, _, base_path, skip in COMPONENTS:
        if skip and issubclass(cls, _import(base_path)):
            return skip
    return None


def _import(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


# ---- sections -------------------------------------------------------------------------------------------------


def _top_level(parser: Any) -> Section:
    keys = []
    for action in _leaf_actions(parser):
        if "." not in action.dest and action.dest not in ("model", "data"):
            keys.append(_leaf_key(action.dest, action, None))
    for name, link, what in (
        ("trainer", "trainer", "Lightning Trainer arguments"),
        ("model", "model-stages-model", "the stage module: `class_path` + `init_args`"),
        ("data", "data-data", "the data module (`class_path` + `init_args`), or a path to a data YAML"),
    ):
        keys.append(Key(f"`{name}`", f"[{what}](#{link})", "", ""))
    return Section(
        "Top level",
        "top-level",
        "",
        "The sections of a recipe, plus the keys `codetune fit` itself takes.",
        keys,
    )


def _trainer(parser: Any, defaults: dict[str, Any]) -> Section:
    keys = [
        _leaf_key(action.dest[len("trainer.") :], action, None)
        for action in _leaf_actions(parser)
        if action.dest.startswith("trainer.")
    ]
    callbacks = ", ".join(f"`{type(c).__name__}`" for c in defaults.get("callbacks", []))
    summary = (
        "Arguments of `lightning.pytorch.Trainer` (descriptions are Lightning's), with codetune's defaults "
        "where they differ."
    )
    if callbacks:
        summary += f" codetune always adds the callbacks {callbacks} to those a recipe lists."
    return Section("trainer", "trainer", "trainer", summary, keys)


def _class_section(cls: type, registry: _Registry, skip: str | None) -> Section:
    path = registry.paths[cls]
    child_prefix = path if dataclasses.is_dataclass(cls) else f"{path}.init_args"
    parser = _class_parser(cls, skip)
    signature_defaults = _signature_defaults(cls)
    entries: list[tuple[str, Any, type | None]] = [  # (key, leaf action or nested group, nested dataclass)
        (action.dest, action, None) for action in _leaf_actions(parser) if "." not in action.dest
    ]
    for name, group in parser.groups.items():
        nested = getattr(group, "group_class", None)
        if nested is not None and "." not in name and nested is not cls:
            entries.append((name, group, nested))
    order = list(signature_defaults)
    entries.sort(key=lambda e: order.index(e[0]) if e[0] in order else len(order))
    keys = []
    for name, source, nested in entries:
        if nested is None:
            hint = getattr(source, "_typehint", None)
            for found in _codetune_classes(hint):
                registry.add(found, f"{child_prefix}.{name}" + ("[]" if _is_list(hint) else ""))
            keys.append(_leaf_key(name, source, hint))
        else:
            registry.add(nested, f"{child_prefix}.{name}")
            required = signature_defaults.get(name, _UNSET) is _UNSET
            keys.append(
                Key(
                    f"`{name}`",
                    _link(nested),
                    "**required**" if required else "see its keys",
                    _clean(source.title or ""),
                )
            )
    title = _qualified(cls)
    return Section(title, _anchor(title), path, _summary(cls), keys)


def _leaf_actions(parser: Any) -> list[Any]:
    """The parser's typed value arguments (not its config-file, help or group-loading actions)."""
    # jsonargparse does not export ActionTypeHint; its name is stable across 4.x.
    return [action for action in parser._actions if type(action).__name__ == "ActionTypeHint"]


def _leaf_key(name: str, action: Any, hint: Any) -> Key:
    hint = hint if hint is not None else getattr(action, "_typehint", None)
    default = "**required**" if action.required else _default(action.default)
    return Key(f"`{name}`", _type(hint), default, _clean(action.help or ""))


def _signature_defaults(cls: type) -> dict[str, Any]:
    """Parameter name -> default (``_UNSET`` when required), in declaration order."""
    if dataclasses.is_dataclass(cls):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = _UNSET
        return out
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    return {
        name: (_UNSET if p.default is inspect.Parameter.empty else p.default)
        for name, p in parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


# ---- formatting -----------------------------------------------------------------------------------------------


def _markdown(section: Section, level: int = 2) -> list[str]:
    lines = [f"{'#' * level} {section.title}", ""]
    if section.used_at:
        lines += [f"Recipe key: `{section.used_at}`", ""]
    if section.summary:
        lines += [section.summary, ""]
    if section.keys:
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for key in section.keys:
            lines.append(
                f"| {key.name} | {_cell(key.type)} | {_cell(key.default)} | {_cell(key.description)} |"
            )
        lines.append("")
    return lines


def _summary(cls: type) -> str:
    """The class docstring's first paragraph."""
    doc = inspect.getdoc(cls) or ""
    return _clean(doc.split("\n\n")[0])


def _qualified(cls: type) -> str:
    """What a recipe writes as ``class_path`` (the shortest import path); a dataclass by its bare name."""
    if dataclasses.is_dataclass(cls):
        return cls.__name__
    parts = cls.__module__.split(".")
    for end in range(2, len(parts) + 1):
        module = ".".join(parts[:end])
        if getattr(importlib.import_module(module), cls.__name__, None) is cls:
            return f"{module}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _link(cls: type) -> str:
    title = _qualified(cls)
    return f"[{cls.__name__}](#{_anchor(title)})"


def _codetune_classes(hint: Any) -> list[type]:
    """codetune classes mentioned anywhere in a type hint (``X | None``, ``list[A | B]``, ...)."""
    found: list[type] = []
    if inspect.isclass(hint) and hint.__module__.startswith("codetune.") and hint not in found:
        found.append(hint)
    for arg in typing.get_args(hint):
        found += [c for c in _codetune_classes(arg) if c not in found]
    return found


def _is_list(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return True
    return origin in (typing.Union, types.UnionType) and any(_is_list(a) for a in typing.get_args(hint))


def _type(hint: Any) -> str:
    """A readable type: ``int | None``, ``"nf4" | "fp4"``, ``list[str]``, links to codetune classes."""
    if hint is None:
        return ""
    if hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:  # strings quoted, so `"64"` and `64` read apart
        return " | ".join(f'`"{a}"`' if isinstance(a, str) else f"`{a!r}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        return " | ".join(parts + (["null"] if type(None) in args else []))
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        if name == "Callable" and args:
            params, result = args
            shown = ", ".join(_type(a) for a in params) if isinstance(params, (list, tuple)) else "..."
            return f"Callable[[{shown}], {_type(result)}]"
        return f"{name}[{', '.join(_type(a) for a in args)}]"
    if inspect.isclass(hint):
        if hint.__module__.startswith("codetune."):
            return _link(hint)
        return hint.__name__
    if hint is Any:
        return "Any"
    return str(hint).replace("typing.", "")


def _default(value: Any) -> str:
    import yaml

    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"`{value!r}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, (dict, list, tuple)):
        plain = _plain(value)
        text = yaml.safe_dump(plain, default_flow_style=True, sort_keys=False, width=10_000).strip()
        return f"`{text}`"
    if inspect.isclass(value):
        return f"`{value.__module__}.{value.__qualname__}`"
    if isinstance(value, datetime.timedelta):
        return f"`{value}`"
    return f"`{type(value).__name__}`"


def _plain(value: Any) -> Any:
    """YAML-safe copy of a default (classes and other objects by name)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    if inspect.isclass(value):
        return f"{value.__module__}.{value.__qualname__}"
    return type(value).__name__


def _clean(text: str) -> str:
    """One line; reStructuredText literals and roles (``x``, :class:`~a.b.C`) as markdown code."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r":\w+:`~[\w.]*?\.?(\w+)`", r"`\1`", text)
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text)
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _cell(text: str) -> str:
    """A table cell: pipes escaped, and ``<tag>``-like text outside code spans shown, not read as HTML."""
    parts = re.split(r"(`[^`]*`)", text)
    parts = [p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in parts]
    return "".join(parts).replace("|", "\\|")


if __name__ == "__main__":
    sys.exit(main())
