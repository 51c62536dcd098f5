"""The ``codetune`` command: parse the command line and call the command (:mod:`codetune.commands`).

``fit``, ``validate`` and ``test`` run a recipe through LightningCLI (:mod:`codetune.commands.fit`); the other
commands are typed functions, parsed by jsonargparse from their signatures, so ``--help``, the docs and the
notebook API (:mod:`codetune.api`) read the same schema.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import CLI

from codetune.commands import COMMANDS, RECIPE_COMMANDS, resolve
from codetune.errors import first_line


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: codetune {fit,validate,test," + ",".join(COMMANDS) + "} [--config recipe.yaml] [...]")
        print("  fit|validate|test   run a recipe through Lightning (see `codetune fit --help`)")
        for name, (_, line) in COMMANDS.items():
            print(f"  {name:<19} {line} (see `codetune {name} --help`)")
        return
    command, rest = argv[0], argv[1:]
    if command not in (*RECIPE_COMMANDS, *COMMANDS):
        close = difflib.get_close_matches(command, [*RECIPE_COMMANDS, *COMMANDS], n=1)
        raise SystemExit(
            f"codetune: unknown command {command!r}"
            + (f" (did you mean {close[0]}?)" if close else "")
            + f"; choose one of {[*RECIPE_COMMANDS, *COMMANDS]}"
        )
    try:
        if command in RECIPE_COMMANDS:
            if "-h" in rest or "--help" in rest:
                # codetune's own options first, at once: Lightning's list (490 lines) needs torch imported.
                print(recipe_help(command), flush=True)
            _check_config_paths(rest)
            # Lightning starts the other processes of a multi-device run by re-running sys.argv, so it must hold
            # the whole command; LightningCLI parses it from there.
            saved_argv, sys.argv = sys.argv, [sys.argv[0], command, *rest]
            try:
                # Imported here, not at the top: the recipe commands import torch and Lightning, which
                # `codetune --help` and the function commands' own help should not wait for.
                from codetune.commands.fit import CodetuneCLI

                CodetuneCLI()
            finally:
                sys.argv = saved_argv
        else:
            if command == "preview":
                rest = preview_args(rest)
            elif command == "plan":  # jsonargparse keeps `--config` for itself; here it names the recipe
                rest = [
                    "--recipe" + a[len("--config") :] if a.split("=")[0] == "--config" else a for a in rest
                ]
            fn = resolve(command)
            target = fn.get(rest[0]) if isinstance(fn, dict) and rest else fn
            if callable(target):
                rest = bare_flags_as_true(target, rest)
            if callable(target) and isinstance(fn, dict):
                rest = [rest[0], *leading_positionals(target, rest[1:])]
            _print_result(CLI(fn, args=rest, as_positional=False, prog=f"codetune {command}"))
    except (ValueError, OSError) as err:
        # Bad input (a recipe value, a path, a data file) is reported in one line; the traceback helps only
        # when the bug is ours, so it is one variable away.
        if os.environ.get("CODETUNE_DEBUG"):
            raise
        raise SystemExit(
            f"codetune {command}: error: {root_cause(err)} (CODETUNE_DEBUG=1 shows the traceback)"
        ) from None


PREVIEW_OPTIONS = ("--recipe", "--rows", "--out", "--split", "--overrides", "-h", "--help", "--print_config")


def preview_args(args: list[str]) -> list[str]:
    """``codetune preview`` as the docs write it: ``--config`` names the recipe (jsonargparse keeps ``--config``
    for itself, so it becomes ``--recipe``), and any recipe key (``--data.init_args.seq_len 128``) is an override,
    as for ``codetune fit``, instead of a JSON list in ``--overrides``."""
    out: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, _ = arg.partition("=")
        if flag == "--config":
            flag, arg = "--recipe", "--recipe" + arg[len("--config") :]
        if flag in ("-h", "--help"):
            print("usage: codetune preview --config RECIPE.yaml [--rows N] [--out FILE] [--split train|validation]"
                  " [--KEY.PATH VALUE ...]\n", flush=True)  # fmt: skip
        value_follows = not eq and i + 1 < len(args) and not args[i + 1].startswith("--")
        taken = [arg] + ([args[i + 1]] if value_follows else [])
        if flag.startswith("--") and flag not in PREVIEW_OPTIONS:
            overrides += [arg] if eq or not value_follows else [f"{arg}={args[i + 1]}"]
        else:
            out += taken
        i += len(taken)
    if overrides:
        given: list[str] = []
        if "--overrides" in out and out.index("--overrides") + 1 < len(out):
            at = out.index("--overrides")
            given = json.loads(out[at + 1])
            del out[at : at + 2]
        for a in [a for a in out if a.startswith("--overrides=")]:
            given += json.loads(a.split("=", 1)[1])
            out.remove(a)
        out += ["--overrides", json.dumps([*given, *overrides])]
    return out


def recipe_help(command: str) -> str:
    """The part of ``codetune fit|validate|test --help`` that is codetune's own, printed before Lightning's list."""
    return f"""usage: codetune {command} --config RECIPE.yaml [--KEY.PATH VALUE ...]

codetune's own options (the rest below are Lightning's Trainer, the model's and the data module's):
  --config RECIPE.yaml  The recipe (recipes/*.yaml); give several and later ones override earlier ones.
  --data DATA.yaml      Another data module (data_modules/*.yaml); a source list replaces the recipe's.
  --ckpt_path PATH      Resume: a checkpoint, a run directory, or `last` (the newest run of this recipe).
  --print_config        Print the resolved recipe, every default filled in, and exit.
  --KEY.PATH VALUE      Override any recipe key, e.g. --trainer.max_steps 50,
                        --model.init_args.optimizer.init_args.lr 1e-3, --data.init_args.seq_len 512.

The options of one part:
  --model.help codetune.modules.CausalLM   (or FIMStage, InstructStage, LongContextStage)
  --data.help codetune.data.CodeDataModule
  every key with its default: docs/recipe-reference.md; the full list of this command follows.
"""


def _print_result(result: Any) -> None:
    """What a function command answers goes to stdout (logs go to stderr): the infilled middle, eval scores."""
    if isinstance(result, str):
        print(result)
    elif isinstance(result, dict) and "scores" in result:
        print(json.dumps(result["scores"]))


def bare_flags_as_true(fn: Callable[..., Any], args: list[str]) -> list[str]:
    """Let ``--overwrite`` stand for ``--overwrite true`` for the boolean parameters of ``fn``."""
    import typing

    hints = typing.get_type_hints(fn)
    flags = {f"--{name}" for name, hint in hints.items() if hint is bool}
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        nxt = args[i + 1] if i + 1 < len(args) else None
        if arg in flags and (nxt is None or nxt.startswith("--")):
            out.append("true")
    return out


def leading_positionals(fn: Callable[..., Any], args: list[str]) -> list[str]:
    """Let ``codetune eval report A B`` stand for ``... report --runs+ A --runs+ B`` where ``fn.positional`` names a list
    parameter: the bare arguments before the first option are its values."""
    name = getattr(fn, "positional", None)
    bare = 0
    while bare < len(args) and not args[bare].startswith("-"):
        bare += 1
    if name is None or not bare:
        return args
    # `--runs+ VALUE` appends one item (jsonargparse), so a path holding a comma stays one path.
    return [arg for value in args[:bare] for arg in (f"--{name}+", value)] + args[bare:]


def root_cause(err: BaseException) -> str:
    """The message worth showing from an error chain, in one line.

    jsonargparse wraps a constructor's error in union/type errors, so the outermost error is rarely it. The
    outermost error that codetune itself raised is: it names the file, key or line and what to do, and the
    errors below it (a ``json`` decoder's internals, say) are what it explains. Without one, the innermost.
    """
    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    ours = [e for e in chain if _raised_by_codetune(e)]
    chosen = ours[0] if ours else chain[-1]
    return first_line(chosen)


def _raised_by_codetune(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(Path(__file__).resolve().parent)


def _check_config_paths(args: list[str]) -> None:
    """Fail in one line, before anything is built, when a --config or --data file does not exist or is not YAML
    (jsonargparse would name neither the file nor the line)."""
    for i, arg in enumerate(args):
        for flag in ("--config", "--data"):
            value = None
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value and value.endswith((".yaml", ".yml")):
                if not Path(value).is_file():
                    raise SystemExit(f"codetune: {flag} {value}: no such file")
                _check_yaml(flag, value)


def _check_yaml(flag: str, path: str) -> None:
    import yaml  # PyYAML is jsonargparse's own YAML reader, so what parses here parses there

    try:
        yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SystemExit(
            f"codetune: {flag} {path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise SystemExit(
            f"codetune: {flag} {path}: {where}not valid YAML ({problem}); fix the file"
        ) from None


if __name__ == "__main__":
    main()
