"""Writes the small demo data sets shipped beside it (run from the repo root; the outputs are committed).

* ``instruct-demo.jsonl``: short Python questions and answers in ``messages`` form, written for codetune
  (no third-party data), some multi-turn. Deterministic: the same file on every run.
* ``nl-docstrings.jsonl``: English prose for the natural-language rehearsal share: the prose paragraphs of the
  standard library's module docstrings (``{"text": ...}``), read from this interpreter's sources.
* ``code-demo.jsonl``: a small JSONL code corpus (``{"path", "content"}``) of short standard-library modules.

Usage: ``python data_modules/data/make_demo_data.py``
"""

from __future__ import annotations

import ast
import json
import re
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "tkinter", "turtledemo"}

# --- instruction pairs ---------------------------------------------------------------------------------

AGGREGATES = [
    ("total", "sum of", "return sum(values)"),
    ("largest", "largest value in", "return max(values)"),
    ("smallest", "smallest value in", "return min(values)"),
    ("mean", "arithmetic mean of", "return sum(values) / len(values)"),
    (
        "product",
        "product of",
        "result = 1\n    for value in values:\n        result *= value\n    return result",
    ),
    ("spread", "difference between the largest and smallest value in", "return max(values) - min(values)"),
    ("count_positive", "number of positive values in", "return sum(1 for value in values if value > 0)"),
    ("count_even", "number of even integers in", "return sum(1 for value in values if value % 2 == 0)"),
]

STRING_TASKS = [
    ("reverse_text", "returns the string reversed", "return text[::-1]"),
    (
        "count_vowels",
        "counts the vowels (a, e, i, o, u, either case) in a string",
        'return sum(1 for ch in text.lower() if ch in "aeiou")',
    ),
    (
        "is_palindrome",
        "tells whether a string reads the same forwards and backwards, ignoring case",
        "cleaned = text.lower()\n    return cleaned == cleaned[::-1]",
    ),
    (
        "title_words",
        "capitalises the first letter of every word",
        'return " ".join(word.capitalize() for word in text.split())',
    ),
    (
        "squeeze_spaces",
        "collapses runs of whitespace into single spaces and strips the ends",
        'return " ".join(text.split())',
    ),
    (
        "first_word",
        "returns the first word of a sentence, or an empty string",
        'words = text.split()\n    return words[0] if words else ""',
    ),
    (
        "word_lengths",
        "returns the length of every word in a sentence, in order",
        "return [len(word) for word in text.split()]",
    ),
    (
        "initials",
        "returns the upper-case initials of a full name, like 'A.L.' for 'ada lovelace'",
        'return "".join(part[0].upper() + "." for part in text.split())',
    ),
    (
        "strip_digits",
        "removes every digit from a string",
        'return "".join(ch for ch in text if not ch.isdigit())',
    ),
    (
        "longest_word",
        "returns the longest word in a sentence (the first one on ties)",
        'return max(text.split(), key=len, default="")',
    ),
]

COLLECTION_TASKS = [
    (
        "dedupe",
        "removes duplicates from a list while keeping the first occurrence of each item in order",
        "items",
        "seen = set()\n    result = []\n    for item in items:\n        if item not in seen:\n            seen.add(item)\n            result.append(item)\n    return result",
    ),
    (
        "flatten",
        "flattens a list of lists by one level",
        "lists",
        "return [item for inner in lists for item in inner]",
    ),
    (
        "chunk",
        "splits a list into consecutive pieces of at most `size` items",
        "items, size",
        "return [items[i : i + size] for i in range(0, len(items), size)]",
    ),
    (
        "invert",
        "swaps the keys and values of a dictionary",
        "mapping",
        "return {value: key for key, value in mapping.items()}",
    ),
    (
        "merge",
        "merges two dictionaries, the second one winning on shared keys",
        "first, second",
        "return {**first, **second}",
    ),
    (
        "frequencies",
        "counts how often each item occurs in a list and returns a dictionary",
        "items",
        "counts = {}\n    for item in items:\n        counts[item] = counts.get(item, 0) + 1\n    return counts",
    ),
    (
        "pairwise_sums",
        "returns the sums of neighbouring items of a list",
        "values",
        "return [a + b for a, b in zip(values, values[1:])]",
    ),
    (
        "rotate",
        "rotates a list to the left by `steps` positions",
        "items, steps",
        "if not items:\n        return []\n    steps %= len(items)\n    return items[steps:] + items[:steps]",
    ),
    (
        "group_by_length",
        "groups words into a dictionary keyed by word length",
        "words",
        "groups = {}\n    for word in words:\n        groups.setdefault(len(word), []).append(word)\n    return groups",
    ),
    (
        "running_total",
        "returns the running totals of a list of numbers",
        "values",
        "totals = []\n    current = 0\n    for value in values:\n        current += value\n        totals.append(current)\n    return totals",
    ),
]

BUILTINS = [
    (
        "enumerate",
        "pairs each item of an iterable with its index, counting from 0 unless you pass `start`",
        'for index, name in enumerate(["ada", "grace"], start=1):\n    print(index, name)',
    ),
    (
        "zip",
        "walks several iterables in step and yields tuples of their items, stopping at the shortest",
        "names = [\"x\", \"y\"]\nvalues = [1, 2]\nprint(dict(zip(names, values)))  # {'x': 1, 'y': 2}",
    ),
    (
        "sorted",
        "returns a new sorted list from any iterable; `key` chooses what to compare and `reverse=True` flips the order",
        "print(sorted([\"pear\", \"fig\", \"apple\"], key=len))  # ['fig', 'pear', 'apple']",
    ),
    (
        "any",
        "is True when at least one item of an iterable is truthy, and stops at the first one",
        "print(any(n > 10 for n in [3, 12, 5]))  # True",
    ),
    (
        "all",
        "is True when every item of an iterable is truthy (and for an empty iterable)",
        "print(all(word.islower() for word in ['a', 'b']))  # True",
    ),
    (
        "isinstance",
        "checks whether an object is an instance of a class or of any class in a tuple",
        "print(isinstance(3.0, (int, float)))  # True",
    ),
    (
        "reversed",
        "returns an iterator over a sequence from the end to the start, without copying it",
        "print(list(reversed([1, 2, 3])))  # [3, 2, 1]",
    ),
    (
        "dict.get",
        "looks up a key and returns a default (None unless given) instead of raising KeyError",
        'ages = {"ada": 36}\nprint(ages.get("grace", 0))  # 0',
    ),
    (
        "str.join",
        "concatenates the strings of an iterable with the string it is called on between them",
        'print(", ".join(["a", "b", "c"]))  # a, b, c',
    ),
    (
        "str.split",
        "splits a string on a separator, or on runs of whitespace when none is given",
        "print(\"a  b c\".split())  # ['a', 'b', 'c']",
    ),
    (
        "range",
        "produces evenly spaced integers lazily: range(stop), range(start, stop) or range(start, stop, step)",
        "print(list(range(2, 10, 3)))  # [2, 5, 8]",
    ),
    (
        "min",
        "returns the smallest item of an iterable (or of its arguments); `key` and `default` work as in sorted",
        'print(min(["pear", "fig"], key=len))  # fig',
    ),
]

ERRORS = [
    (
        "KeyError",
        "a dictionary lookup used a key that is not in the dictionary",
        "use `mapping.get(key)` or check `key in mapping` first",
    ),
    (
        "IndexError",
        "a sequence was indexed past its end (or before its start with a too negative index)",
        "check the length, or iterate over the items instead of indexing",
    ),
    (
        "TypeError",
        "an operation got a value of the wrong type, such as adding a string to an integer",
        "convert explicitly, for example `str(count)` or `int(text)`",
    ),
    (
        "ValueError",
        "a value has the right type but an unacceptable content, such as `int('abc')`",
        "validate the input or catch the error where bad input is expected",
    ),
    (
        "AttributeError",
        "an object has no attribute with that name, often because a variable is None",
        "check where the object comes from and whether it can be None",
    ),
    ("ZeroDivisionError", "a number was divided by zero", "check the divisor before dividing"),
    (
        "FileNotFoundError",
        "a file or folder that the program tried to open does not exist",
        "check the path, or create the file first; `pathlib.Path(path).exists()` tells you",
    ),
    (
        "NameError",
        "a name was used before it was assigned, often a typo",
        "check the spelling and the order of assignments",
    ),
]


def _instruct_records() -> list[dict]:
    records: list[dict] = []

    def add(*turns: str) -> None:
        roles = ["user", "assistant"] * len(turns)
        records.append({"messages": [{"role": r, "content": c} for r, c in zip(roles, turns, strict=False)]})

    for name, what, body in AGGREGATES:
        add(
            f"Write a Python function `{name}(values)` that returns the {what} a list of numbers.",
            f"```python\ndef {name}(values):\n    {body}\n```",
        )
        add(
            f"How do I get the {what} a list in Python?",
            f"Wrap it in a small function:\n\n```python\ndef {name}(values):\n    {body}\n```\n\n"
            f"For example `{name}([2, 4, 6])`.",
        )
    for name, what, body in STRING_TASKS:
        add(f"Write a function `{name}(text)` that {what}.", f"```python\ndef {name}(text):\n    {body}\n```")
        add(
            f"I need a helper that {what}. Can you write it with a docstring?",
            f'```python\ndef {name}(text: str):\n    """{what[0].upper() + what[1:]}."""\n    {body}\n```',
        )
    for name, what, params, body in COLLECTION_TASKS:
        add(f"Write `{name}({params})`, which {what}.", f"```python\ndef {name}({params}):\n    {body}\n```")
        add(
            f"In Python, what is a clean way to write a function that {what}?",
            f"A plain loop or comprehension is clearest:\n\n```python\ndef {name}({params}):\n    {body}\n```",
        )
        add(
            f"Here is my attempt at a function that {what}:\n\n```python\ndef {name}({params}):\n    pass\n```\n"
            "Can you fill in the body?",
            f"```python\ndef {name}({params}):\n    {body}\n```",
        )
    for builtin, what, example in BUILTINS:
        add(
            f"What does `{builtin}` do in Python?",
            f"`{builtin}` {what}. For example:\n\n```python\n{example}\n```",
        )
        add(f"Show me a short example of `{builtin}`.", f"```python\n{example}\n```\n\nIt {what}.")
    for error, cause, fix in ERRORS:
        add(f"What does a `{error}` mean?", f"A `{error}` means that {cause}. To fix it, {fix}.")
        add(
            f"My script stops with `{error}`. What should I look at?",
            f"That error says {cause}. Look at the line in the traceback and {fix}.",
        )
    # Multi-turn: a follow-up that refines the first answer.
    add(
        "Write a function `safe_mean(values)` that returns the mean of a list.",
        "```python\ndef safe_mean(values):\n    return sum(values) / len(values)\n```",
        "It crashes on an empty list. Return None in that case instead.",
        "```python\ndef safe_mean(values):\n    if not values:\n        return None\n    return sum(values) / len(values)\n```",
    )
    add(
        "How do I read a text file line by line?",
        'Open it in a `with` block and iterate over the file object:\n\n```python\nwith open(path, encoding="utf-8") as handle:\n    for line in handle:\n        print(line.rstrip("\\n"))\n```',
        "And how do I skip blank lines?",
        'Test the stripped line before using it:\n\n```python\nwith open(path, encoding="utf-8") as handle:\n    for line in handle:\n        if line.strip():\n            print(line.rstrip("\\n"))\n```',
    )
    add(
        "Write a function that saves a dictionary as JSON.",
        '```python\nimport json\n\ndef save_json(data, path):\n    with open(path, "w", encoding="utf-8") as handle:\n        json.dump(data, handle, indent=2)\n```',
        "Now the function that loads it back.",
        '```python\nimport json\n\ndef load_json(path):\n    with open(path, encoding="utf-8") as handle:\n        return json.load(handle)\n```',
    )
    add(
        "What is the difference between a list and a tuple?",
        "A list is mutable: you can append, remove and reassign items. A tuple is immutable, so it can be a "
        "dictionary key or a set member, and it signals a fixed-size record.",
        "When should I use a tuple then?",
        "Use a tuple for a fixed group of values that belong together, such as coordinates `(x, y)` or a "
        "function returning several results; use a list for a collection that grows or changes.",
    )
    records.insert(
        0,
        {
            "messages": [
                {
                    "role": "system",
                    "content": "You are a concise Python assistant. Answer with short, correct code.",
                },
                {"role": "user", "content": "Write a function `square(n)` that returns n times n."},
                {"role": "assistant", "content": "```python\ndef square(n):\n    return n * n\n```"},
            ]
        },
    )
    return records


# --- natural language -------------------------------------------------------------------------------------

_PROSE = re.compile(r"^[A-Z][^\n]*[a-z]")


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs that read as English sentences (not code, tables or option lists)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in para.strip().splitlines()]
        joined = " ".join(lines)
        if len(joined) < 160 or not _PROSE.match(joined) or not joined.rstrip().endswith("."):
            continue
        letters = sum(ch.isalpha() or ch.isspace() for ch in joined)
        if letters / len(joined) < 0.9 or any(tok in joined for tok in (">>>", "::", "{", "=", "__")):
            continue
        out.append(joined)
    return out


def _stdlib_modules() -> list[Path]:
    return sorted(p for p in STDLIB.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(STDLIB).parts))


def _nl_records(limit: int = 150) -> list[dict]:
    records = []
    for path in _stdlib_modules():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        doc = ast.get_docstring(tree) or ""
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                doc += "\n\n" + (ast.get_docstring(node) or "")
        paragraphs = _prose_paragraphs(doc)
        if paragraphs:
            records.append({"text": "\n\n".join(paragraphs)})
        if len(records) == limit:
            break
    return records


def _code_records(limit: int = 40, max_bytes: int = 5000) -> list[dict]:
    records = []
    for path in _stdlib_modules():
        size = path.stat().st_size
        if not 800 <= size <= max_bytes:
            continue
        try:
            content = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        records.append({"path": path.relative_to(STDLIB).as_posix(), "content": content})
        if len(records) == limit:
            break
    return records


def _write(name: str, records: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {HERE / name}")


if __name__ == "__main__":
    _write("instruct-demo.jsonl", _instruct_records())
    _write("nl-docstrings.jsonl", _nl_records())
    _write("code-demo.jsonl", _code_records())
