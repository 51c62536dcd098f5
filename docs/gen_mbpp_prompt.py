"""Write the MBPP prompt shown in docs/evaluation.md from the code that builds it (``--check``: say if stale).

The block between ``<!-- mbpp-prompt:start -->`` and ``<!-- mbpp-prompt:end -->`` is the 3-shot prompt of the
first scored sanitized problem, as :func:`codetune.eval.mbpp.build_prompt` makes it, with the few-shot solutions'
``\\r\\n`` line ends shown as ``\\n``. Needs the MBPP file: ``--data_dir`` or ``$CODETUNE_BENCHMARK_DATA``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from codetune.eval.mbpp import build_prompt, select_problems

PAGE = Path(__file__).resolve().parent / "evaluation.md"
BLOCK = re.compile(r"(<!-- mbpp-prompt:start -->\n).*?(<!-- mbpp-prompt:end -->)", re.S)


def render(page: str, data_dir: str | Path | None = None) -> str:
    """``page`` with its marked block replaced by the prompt as built now."""
    problem = select_problems("sanitized", data_dir, limit=1)[0][0]
    prompt = build_prompt(problem).replace("\r\n", "\n")
    if "\r" in prompt or "```" in prompt:
        raise ValueError("the prompt cannot be shown verbatim in a fenced block")
    if not BLOCK.search(page):
        raise ValueError(f"{PAGE.name} has no <!-- mbpp-prompt:start --> ... <!-- mbpp-prompt:end --> block")
    return BLOCK.sub(lambda m: f"{m.group(1)}```text\n{prompt}```\n{m.group(2)}", page, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed block is stale")
    parser.add_argument("--data_dir", default=None, help="folder with mbpp/sanitized-mbpp.json")
    args = parser.parse_args(argv)
    page = PAGE.read_text(encoding="utf-8")
    text = render(page, args.data_dir)
    if args.check:
        if text != page:
            print(
                f"{PAGE.name} is stale: run `python docs/{Path(__file__).name}` and commit it",
                file=sys.stderr,
            )
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
