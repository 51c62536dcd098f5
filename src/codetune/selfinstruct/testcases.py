"""Generated unit tests as programs: parse them, split them into cases, build what the sandbox runs.

Tests are read with :mod:`ast` (never executed here). Each top-level ``assert`` is one test case; in the
program that judges a candidate (:func:`candidate_program`) every case runs in its own ``try``, the failing
case numbers are collected and, if any failed, raised at the end as one ``AssertionError`` naming them. The
program still passes only when every case passes (the sandbox's rule: it runs to its end), and a failure says
*which* cases failed, so a case that fails on every candidate — more likely a wrong test than ten wrong
solutions — can be told apart from problems the candidates simply did not solve.

A trivial solution defines each function the tests call (and do not define themselves) with a body such as
``pass``; tests such a solution passes check nothing and are rejected as vacuous (:func:`trivial_program`).
"""

from __future__ import annotations

import ast
import builtins
import re
import textwrap
from dataclasses import dataclass

FAILED_CASES = "_codetune_failed_cases"
FAILED_MARK = "codetune: failed test cases"
_FAILED_RE = re.compile(re.escape(FAILED_MARK) + r"((?: \d+)+)")
_BUILTINS = frozenset(dir(builtins))


@dataclass(frozen=True)
class TestSuite:
    """One problem's tests, parsed."""

    __test__ = False  # not a pytest test class, despite its name
    source: str
    """The tests as generated (fences removed)."""
    cases: tuple[str, ...]
    """Source of each top-level assert, in order: case ``i`` is ``cases[i - 1]``."""
    entry_points: tuple[str, ...]
    """Functions the tests call without defining or importing them: what a solution must define."""
    harness: str
    """The tests with each top-level assert run as its own case (see the module docstring)."""

    @property
    def first_test(self) -> str:
        """The example test a solution prompt shows (Code Llama: one test to read the signature from)."""
        return self.cases[0] if self.cases else self.source.strip().splitlines()[0]


def parse_tests(source: str) -> tuple[TestSuite | None, str, str]:
    """``(suite, "ok", "")`` or ``(None, status, detail)`` with status ``no_tests``, ``syntax_error`` or
    ``no_asserts``."""
    if not source.strip():
        return None, "no_tests", "the answer holds no tests"
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as err:  # ValueError: a NUL byte in the source
        return None, "syntax_error", f"{type(err).__name__}: {getattr(err, 'msg', err)}"
    if not any(isinstance(node, ast.Assert) for node in ast.walk(tree)):
        return None, "no_asserts", "the tests contain no assert statement"
    cases = tuple(
        ast.get_source_segment(source, node) or ast.unparse(node)
        for node in tree.body
        if isinstance(node, ast.Assert)
    )
    return TestSuite(source, cases, tuple(_entry_points(tree)), _harness(tree)), "ok", ""


def _entry_points(tree: ast.Module) -> list[str]:
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    called = [
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    ]
    return [name for name in dict.fromkeys(called) if name not in bound and name not in _BUILTINS]


def _harness(tree: ast.Module) -> str:
    record = ast.parse(f"{FAILED_CASES} = []").body
    body: list[ast.stmt] = list(record)
    case = 0
    for node in tree.body:
        if not isinstance(node, ast.Assert):
            body.append(node)
            continue
        case += 1
        failed = ast.parse(f"{FAILED_CASES}.append({case})").body
        handler = ast.ExceptHandler(type=ast.Name("Exception", ast.Load()), name=None, body=failed)
        body.append(ast.Try(body=[node], handlers=[handler], orelse=[], finalbody=[]))
    body += ast.parse(
        f"if {FAILED_CASES}:\n"
        f"    raise AssertionError({FAILED_MARK!r} + ' ' + ' '.join(map(str, {FAILED_CASES})))"
    ).body
    module = ast.Module(body=body, type_ignores=[])
    # unparse (not text surgery): a multi-line string inside an assert must not be re-indented into the try.
    return ast.unparse(ast.fix_missing_locations(module))


def candidate_program(code: str, suite: TestSuite) -> str:
    """What the sandbox runs for one candidate: its code, then the tests case by case."""
    return f"{code.rstrip()}\n\n\n{suite.harness}\n"


def trivial_program(suite: TestSuite, body: str) -> str:
    """A trivial solution (each entry point with ``body``) followed by the tests."""
    indented = textwrap.indent(body.strip() or "pass", "    ")
    defs = "".join(f"def {name}(*args, **kwargs):\n{indented}\n\n\n" for name in suite.entry_points)
    return candidate_program(defs or "# (the tests call no function of their own)", suite)


def failed_cases(result: str) -> list[int] | None:
    """Numbers of the cases a run's result names as failed; None when the run failed before its cases did
    (a syntax error, a timeout, an exception outside the asserts) or passed."""
    match = _FAILED_RE.search(result)
    return [int(n) for n in match.group(1).split()] if match else None
