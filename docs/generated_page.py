"""The command line both reference generators share: write the page, or with ``--check`` say it is stale."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def write_or_check(out: Path, render: Callable[[], str], regenerate: str, description: str, argv=None) -> int:
    """Write ``render()`` to ``out``; with ``--check``, exit 1 when the committed page differs from it."""
    args = argparse.ArgumentParser(description=description)
    args.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    options = args.parse_args(argv)
    text = render()
    if options.check:
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            print(f"{out.name} is stale: run `{regenerate}` and commit the result", file=sys.stderr)
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0
