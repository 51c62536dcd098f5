"""The published benchmark files, pinned by SHA-256: HumanEval-Infilling's four task sets and MBPP.

Scores are comparable with the papers' tables only on the papers' tasks, so codetune reads the files the
papers used, byte for byte: the four task sets of ``openai/human-eval-infilling`` (Bavarian et al. 2022, the
benchmark of the SantaCoder, StarCoder and Code Llama infilling tables) and the two MBPP files of
``google-research/google-research`` (Austin et al. 2021). A file is found, in this order:

1. in a local folder, ``data_dir`` or else ``$CODETUNE_BENCHMARK_DATA``, as ``<folder>/<group>/<file>`` or
   ``<folder>/<file>`` (``<group>`` is ``human-eval-infilling`` or ``mbpp``);
2. in the cache, ``<cache>/benchmarks/<group>/<file>`` (see :func:`codetune.storage.cache_root`);
3. downloaded from its public URL at a pinned commit into that cache.

Whichever copy is used must have the pinned SHA-256, or loading stops before any model work: a score on another
version of a file is not the published benchmark. Fetch everything ahead of time (CI, an air-gapped machine) with
``python -m codetune.eval.benchmarks``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from codetune.storage import cache_root

log = logging.getLogger(__name__)

DATA_ENV = "CODETUNE_BENCHMARK_DATA"
"""Environment variable naming a local folder that holds the benchmark files."""

# The one commit of openai/human-eval-infilling ("squash commit", 2022-07-28); its data/ holds the four sets.
INFILLING_COMMIT = "88062ff9859c875d04db115b698ed4b0f0395170"
# google-research/google-research commits whose mbpp/ files are the ones pinned below (the files changed over
# the repository's history; each URL names a commit at which its file has exactly the pinned bytes).
MBPP_SANITIZED_COMMIT = "30adf0ec5f35f9609c2f1d896005e184195d9146"
MBPP_FULL_COMMIT = "2251e8c67a7fe7d6348714967ee101080b28e956"

InfillingMode = Literal["single-line", "multi-line", "random-span", "random-span-light"]
MBPPVariant = Literal["sanitized", "full"]


@dataclass(frozen=True)
class BenchmarkFile:
    """One published benchmark file: where it comes from and the bytes it must have."""

    group: str
    """Sub-folder in a data folder and in the cache (``human-eval-infilling`` or ``mbpp``)."""
    name: str
    """File name as published."""
    sha256: str
    url: str
    """Public download at a pinned commit."""
    license: str


def _infilling_file(name: str, sha256: str) -> BenchmarkFile:
    url = f"https://raw.githubusercontent.com/openai/human-eval-infilling/{INFILLING_COMMIT}/data/{name}"
    return BenchmarkFile("human-eval-infilling", name, sha256, url, "MIT (openai/human-eval-infilling)")


def _mbpp_file(name: str, commit: str, sha256: str) -> BenchmarkFile:
    url = f"https://raw.githubusercontent.com/google-research/google-research/{commit}/mbpp/{name}"
    return BenchmarkFile("mbpp", name, sha256, url, "CC BY 4.0 (MBPP, Austin et al. 2021)")


INFILLING_FILES: dict[str, BenchmarkFile] = {
    "single-line": _infilling_file(
        "HumanEval-SingleLineInfilling.jsonl.gz",
        "1277073e7ddce163ef68598c2bca777f688a53df99422f097e37362090f88e1f",
    ),
    "multi-line": _infilling_file(
        "HumanEval-MultiLineInfilling.jsonl.gz",
        "2f341612eee1d35da1357a4f365e0c0b3ba6e2b62eb491e88aaefa4855af0349",
    ),
    "random-span": _infilling_file(
        "HumanEval-RandomSpanInfilling.jsonl.gz",
        "b4f330d8a8ff97bf85d9def497dffcae4d741e506449386a877236e422e33e8d",
    ),
    "random-span-light": _infilling_file(
        "HumanEval-RandomSpanInfillingLight.jsonl.gz",
        "1432250ecac0cb56e6f97f8faf0970419ef892a98fda7e1f5aa4c4b87209b760",
    ),
}
# Task counts of the published sets (Bavarian et al. 2022, Sec. 5.1): a parsed file must have exactly these.
INFILLING_SIZES = {"single-line": 1033, "multi-line": 5815, "random-span": 1640, "random-span-light": 164}

MBPP_FILES: dict[str, BenchmarkFile] = {
    "sanitized": _mbpp_file(
        "sanitized-mbpp.json",
        MBPP_SANITIZED_COMMIT,
        "ca95deaa9a01ef0a6f439f88bcf0dd3db3563d22f22aad6cae04ebb9a8d8c8e9",
    ),
    "full": _mbpp_file(
        "mbpp.jsonl", MBPP_FULL_COMMIT, "0b7004a79cd62d9ec7ecdd5a6e5f0ef1210ff00b286df3c5d5b57bf38c58e19a"
    ),
}
MBPP_SIZES = {"sanitized": 427, "full": 974}
MBPP_EVAL_IDS = range(11, 511)
"""The evaluation split (task ids 11-510, the MBPP README); ids 1-10 are for prompting, 511+ for training."""
MBPP_FEWSHOT_IDS = (2, 3, 4)
"""The three prompting tasks of Austin et al.'s 3-shot prompt (and of lm-evaluation-harness's ``mbpp``)."""


class BenchmarkUnavailable(FileNotFoundError):
    """A benchmark file is not on this machine and cannot be downloaded (offline, no local copy)."""


T = TypeVar("T")


@dataclass(frozen=True)
class TaskSet(Generic[T]):
    """The tasks of one benchmark file and where they came from (for the results JSON)."""

    name: str
    """``HumanEval-SingleLineInfilling``, ``mbpp-sanitized``, ..."""
    file: BenchmarkFile
    path: Path
    """The verified copy that was read."""
    tasks: list[T] = field(repr=False)

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file.name,
            "sha256": self.file.sha256,
            "url": self.file.url,
            "path": str(self.path),
            "num_tasks": len(self.tasks),
        }


@dataclass(frozen=True)
class InfillTask:
    """One infilling task: the model sees ``prefix`` and ``suffix`` and must produce ``middle``.

    The program an infill is judged by is ``prefix + infill + suffix``, then ``test`` and
    ``check(entry_point)`` (as human-eval-infilling's ``execution.py`` builds it).
    """

    task_id: str
    """``SingleLineInfilling/HumanEval/0/L0`` (official) or ``HumanEval/0/single-line/0`` (derived)."""
    problem_id: str
    """The HumanEval problem, ``HumanEval/<i>``."""
    prefix: str
    middle: str
    """The reference infill (the official sets' ``canonical_solution``)."""
    suffix: str
    test: str
    entry_point: str


@dataclass(frozen=True)
class MBPPProblem:
    """One MBPP problem: a statement, a reference solution and the asserts that judge a solution."""

    task_id: int
    text: str
    """The problem statement (``prompt`` in the sanitized file, ``text`` in the full one)."""
    code: str
    """Reference solution."""
    test_list: tuple[str, ...]
    test_setup: str
    """Code the asserts need, run after the solution: the sanitized file's ``test_imports`` (one per line), the
    full file's ``test_setup_code``."""


# -- locating files ---------------------------------------------------------------------------------------


def locate(file: BenchmarkFile, data_dir: str | Path | None = None, download: bool = True) -> Path:
    """A verified copy of ``file``: from ``data_dir`` (else ``$CODETUNE_BENCHMARK_DATA``), the cache, or a download.

    A given folder that lacks the file is an error (not a silent download): it was named to be used.
    """
    folder = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    if folder is not None:
        root = Path(folder).expanduser()
        origin = "data_dir" if data_dir is not None else DATA_ENV
        if not root.is_dir():
            raise BenchmarkUnavailable(f"{origin} {folder}: no such folder")
        for path in (root / file.group / file.name, root / file.name):
            if path.is_file():
                _verify(path, file)
                return path
        raise BenchmarkUnavailable(
            f"{origin} {folder} has no {file.group}/{file.name} (nor {file.name}): download {file.url} "
            f"(SHA-256 {file.sha256}) into {root / file.group}/"
        )
    cached = cache_root() / "benchmarks" / file.group / file.name
    if cached.is_file():
        _verify(cached, file)
        return cached
    if not download:
        raise _unavailable(file, "not in the cache")
    return _download(file, cached)


def _download(file: BenchmarkFile, dest: Path) -> Path:
    log.info("downloading %s (%s)", file.name, file.url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        with urllib.request.urlopen(file.url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        actual = sha256_of(partial)
        if actual != file.sha256:
            raise ValueError(
                f"{file.url} served bytes with SHA-256 {actual}, not the pinned {file.sha256} of {file.name}; "
                "nothing was cached"
            )
        os.replace(partial, dest)
    except OSError as err:
        raise _unavailable(file, f"downloading {file.url} failed ({err})") from None
    finally:
        partial.unlink(missing_ok=True)
    return dest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, file: BenchmarkFile) -> None:
    actual = sha256_of(path)
    if actual != file.sha256:
        raise ValueError(
            f"{path}: SHA-256 {actual} is not the pinned {file.sha256} of {file.name}; scores on it would not "
            f"be the published benchmark's. Replace it with {file.url}"
        )


def _unavailable(file: BenchmarkFile, reason: str) -> BenchmarkUnavailable:
    return BenchmarkUnavailable(
        f"{file.name} is not available ({reason}): download {file.url} (SHA-256 {file.sha256}) on a machine "
        f"with access and pass its folder as data_dir (--data_dir) or in {DATA_ENV}"
    )


# -- loading tasks ----------------------------------------------------------------------------------------


def load_infilling_tasks(mode: str, data_dir: str | Path | None = None) -> TaskSet[InfillTask]:
    """The official HumanEval-Infilling task set of ``mode`` (``single-line``, ``multi-line``, ``random-span``,
    ``random-span-light``), in file order."""
    if mode not in INFILLING_FILES:
        raise ValueError(f"unknown infilling task set {mode!r}: use one of {', '.join(INFILLING_FILES)}")
    file = INFILLING_FILES[mode]
    path = locate(file, data_dir)
    tasks = []
    with gzip.open(path, "rt", encoding="utf-8") as rows:
        for lineno, line in enumerate(rows, 1):
            if not line.strip():
                continue
            row = _json_row(
                path,
                lineno,
                line,
                ("task_id", "prompt", "suffix", "canonical_solution", "test", "entry_point"),
            )
            # task ids are "<Set>/HumanEval/<i>/<span>"
            tasks.append(
                InfillTask(
                    task_id=row["task_id"],
                    problem_id="/".join(row["task_id"].split("/")[1:3]),
                    prefix=row["prompt"],
                    middle=row["canonical_solution"],
                    suffix=row["suffix"],
                    test=row["test"],
                    entry_point=row["entry_point"],
                )
            )
    _check_size(path, len(tasks), INFILLING_SIZES[mode])
    return TaskSet(name=file.name.removesuffix(".jsonl.gz"), file=file, path=path, tasks=tasks)


def load_mbpp(variant: str = "sanitized", data_dir: str | Path | None = None) -> TaskSet[MBPPProblem]:
    """All problems of an MBPP file (``sanitized``: 427 hand-verified; ``full``: 974), in task-id order.

    Use :func:`evaluation_split` for the problems that are scored.
    """
    if variant not in MBPP_FILES:
        raise ValueError(f"unknown MBPP variant {variant!r}: use sanitized or full")
    file = MBPP_FILES[variant]
    path = locate(file, data_dir)
    problems = []
    if variant == "sanitized":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err.msg})") from None
        for row in rows:
            problems.append(
                MBPPProblem(
                    task_id=row["task_id"],
                    text=row["prompt"],
                    code=row["code"],
                    test_list=tuple(row["test_list"]),
                    test_setup="\n".join(row["test_imports"]),
                )
            )
    else:
        with open(path, encoding="utf-8") as lines:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                row = _json_row(path, lineno, line, ("task_id", "text", "code", "test_list"))
                problems.append(
                    MBPPProblem(
                        task_id=row["task_id"],
                        text=row["text"],
                        code=row["code"],
                        test_list=tuple(row["test_list"]),
                        test_setup=row.get("test_setup_code", ""),
                    )
                )
    _check_size(path, len(problems), MBPP_SIZES[variant])
    problems.sort(key=lambda p: p.task_id)
    return TaskSet(name=f"mbpp-{variant}", file=file, path=path, tasks=problems)


def evaluation_split(problems: Sequence[MBPPProblem]) -> list[MBPPProblem]:
    """The problems that are scored: task ids 11-510 (never the prompting tasks 1-10 or the training ones)."""
    return [p for p in problems if p.task_id in MBPP_EVAL_IDS]


def _json_row(path: Path, lineno: int, line: str, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{path}:{lineno}: missing fields {missing}")
    return row


def _check_size(path: Path, found: int, expected: int) -> None:
    # The checksum already pins the bytes; this guards the parser (a skipped row would shrink the benchmark).
    if found != expected:
        raise ValueError(f"{path}: parsed {found} tasks, the published set has {expected}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m codetune.eval.benchmarks [--data_dir DIR]``: fetch and verify every file now; print where."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data_dir", default=None, help="local folder with the files (else cache/download)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for file in (*INFILLING_FILES.values(), *MBPP_FILES.values()):
            print(locate(file, args.data_dir))
    except (OSError, ValueError) as err:
        raise SystemExit(f"codetune.eval.benchmarks: {err}") from None


if __name__ == "__main__":
    main()
    sys.exit(0)
