"""The three prompts of self-instruct and how their answers are read back.

The layout follows Code Llama's self-instruct prompts (Rozière et al. 2023, §2.5 and appendix): Llama 2's
``[INST] ... [/INST]`` turns, one worked example, tests between ``[TESTS]`` tags with a ``# Test case n:``
comment above each assert, a solution between ``[PYTHON]`` tags given one example test from which the
function's signature can be read. The wording here is codetune's own. Each prompt ends where the answer
starts (after the opening tag), so a base model continues it as text and the closing tag stops generation.

Templates name their fields in braces (``{n}``, ``{question}``, ``{test}``); only those names are replaced,
so code with other braces in a custom template stays as written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from codetune.eval.generate import truncate_at_stop
from codetune.eval.humaneval import extract_code

PROBLEMS_PROMPT = """[INST] Write {n} programming interview questions of easy and medium difficulty. Cover a wide \
range of subjects and make no two questions alike. Each question must be solvable by a single standalone Python \
function that uses only the standard library. Number the questions, one per line. [/INST]
1. Write a function that returns the maximum nesting depth of a list of lists.
2. Write a function that rotates a list of integers to the right by k steps, where k is non-negative.
3. Write a function that counts the words of a sentence that are exactly n letters long.
"""
"""Asks for ``{n}`` problems; three worked items start the list, so the model continues it at item 4."""

PROBLEMS_STOP = ("[INST]", "[/INST]")

TESTS_PROMPT = """[INST] Write 5 tests that check the correctness of a function solving a programming problem. \
Put the tests between [TESTS] and [/TESTS] tags. Write the comment "# Test case n:" on its own line directly \
above each assert statement, numbering the test cases from 1.
Problem: Write a Python function that returns the unique elements of a list, in order of first appearance.
[/INST]
[TESTS]
# Test case 1:
assert unique_elements([]) == []
# Test case 2:
assert unique_elements([7]) == [7]
# Test case 3:
assert unique_elements([1, 2, 3, 2, 1]) == [1, 2, 3]
[/TESTS]
[INST] Problem: {question}
[/INST]
[TESTS]
"""
"""Five tests for ``{question}``, after one worked example."""

TESTS_STOP = ("[/TESTS]", "[INST]")

SOLUTION_PROMPT = """[INST] Write a Python function that solves a programming problem. Put the code between \
[PYTHON] and [/PYTHON] tags. One example test is given, from which the function's signature can be read.
Problem: Write a Python function that returns the unique elements of a list, in order of first appearance.
Test: assert unique_elements([1, 2, 3, 2, 1]) == [1, 2, 3]
[/INST]
[PYTHON]
def unique_elements(items):
    return list(dict.fromkeys(items))
[/PYTHON]
[INST] Problem: {question}
Test: {test}
[/INST]
[PYTHON]
"""
"""A solution of ``{question}`` given its first test ``{test}``, after one worked example."""

SOLUTION_STOP = ("[/PYTHON]", "[INST]")

_NUMBERED = re.compile(r"^\s*(\d{1,3})\s*[.)]\s+(\S.*?)\s*$")


def render(template: str, **fields: str | int) -> str:
    """``template`` with ``{name}`` replaced by each field (and nothing else replaced)."""
    for name, value in fields.items():
        template = template.replace("{" + name + "}", str(value))
    return template


def check_template(template: str, required: Sequence[str], where: str) -> None:
    """Fail in one line when a template lacks a field it must fill."""
    missing = [f"{{{name}}}" for name in required if "{" + name + "}" not in template]
    if missing:
        raise ValueError(f"{where}: the prompt template has no {', '.join(missing)}; add it where it belongs")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to its first stop string (backends cut there already; scripted or vLLM text may not)."""
    return truncate_at_stop(text, stop)[0]


def numbered_items(text: str, start: int | None = None) -> list[str]:
    """The items of a numbered list (``1. ...`` or ``1) ...``); an unnumbered line continues the item above.

    The list is numbered consecutively: with ``start``, its first item is numbered ``start`` (or 1), and a
    number out of sequence ends it, so digits in noise or in prose after the list are not read as items.

    >>> numbered_items("4. Sort a list.\\n5. Reverse a string\\nin place.\\n\\n9. noise", start=4)
    ['Sort a list.', 'Reverse a string in place.']
    """
    items: list[str] = []
    expected = None
    open_item = False
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match:
            number = int(match.group(1))
            if expected is None and start is not None and number not in (start, 1):
                break
            if expected is not None and number != expected:
                break
            items.append(match.group(2))
            expected, open_item = number + 1, True
        elif line.strip() and open_item:
            items[-1] = f"{items[-1]} {line.strip()}"
        else:
            open_item = False  # a blank line ends the list item; prose after it is not a question
    return items


def solution_code(text: str) -> str:
    """The code of a generated solution: its first fenced block if it has one, else the text; blank lines trimmed."""
    return (extract_code(text) if "```" in text else text).strip("\n")


def tests_code(text: str) -> str:
    """The tests of a generated answer, fences removed, blank lines trimmed."""
    return solution_code(text)
