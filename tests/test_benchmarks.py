"""The pinned benchmark files: found locally, in the cache or downloaded, always checksum-verified; parsed whole."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import urllib.error
import urllib.request

import pytest

from codetune.eval import benchmarks
from codetune.eval.benchmarks import (
    DATA_ENV,
    INFILLING_FILES,
    MBPP_FEWSHOT_IDS,
    MBPP_FILES,
    BenchmarkUnavailable,
    evaluation_split,
    load_infilling_tasks,
    load_mbpp,
    locate,
)
from codetune.eval.humaneval import load_problems
from tests.benchmark_data import data_dir

ALL_FILES = [*INFILLING_FILES.values(), *MBPP_FILES.values()]


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    """No local folder and an empty cache: what a user's first run sees."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("CODETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "benchmarks"


def _serve(monkeypatch, payload_of):
    """Replace the network: ``urlopen(url)`` answers ``payload_of(url)``; returns the list of URLs asked for."""
    asked = []

    def urlopen(url, timeout=None):
        asked.append(url)
        return io.BytesIO(payload_of(url))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


@pytest.mark.parametrize("file", ALL_FILES, ids=lambda f: f.name)
def test_pinned_digest_is_that_of_the_published_file(file):
    path = data_dir() / file.group / file.name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == file.sha256
    assert file.url.startswith("https://raw.githubusercontent.com/") and file.url.endswith("/" + file.name)


def test_a_local_folder_is_read_in_either_layout(tmp_path, no_data_env):
    file = INFILLING_FILES["random-span-light"]
    source = data_dir() / file.group / file.name
    (tmp_path / "nested" / file.group).mkdir(parents=True)
    shutil.copy(source, tmp_path / "nested" / file.group / file.name)
    (tmp_path / "flat").mkdir()
    shutil.copy(source, tmp_path / "flat" / file.name)
    assert locate(file, tmp_path / "nested") == tmp_path / "nested" / file.group / file.name
    assert locate(file, tmp_path / "flat") == tmp_path / "flat" / file.name


def test_the_environment_variable_names_the_folder(monkeypatch, no_data_env):
    monkeypatch.setenv(DATA_ENV, str(data_dir()))
    file = MBPP_FILES["sanitized"]
    assert locate(file) == data_dir() / "mbpp" / file.name


def test_a_modified_copy_is_refused_before_parsing(tmp_path, no_data_env):
    file = MBPP_FILES["sanitized"]
    copy = tmp_path / file.name
    copy.write_bytes((data_dir() / "mbpp" / file.name).read_bytes() + b"\n")
    with pytest.raises(ValueError, match=rf"{copy}: SHA-256 [0-9a-f]{{64}} is not the pinned {file.sha256}"):
        load_mbpp("sanitized", tmp_path)


def test_a_named_folder_without_the_file_is_an_error_not_a_download(tmp_path, monkeypatch, no_data_env):
    asked = _serve(monkeypatch, lambda url: b"")
    with pytest.raises(BenchmarkUnavailable, match="has no human-eval-infilling/HumanEval-SingleLine"):
        load_infilling_tasks("single-line", tmp_path)
    with pytest.raises(BenchmarkUnavailable, match="no such folder"):
        load_infilling_tasks("single-line", tmp_path / "missing")
    assert asked == []


def test_offline_without_a_copy_says_how_to_provide_one(monkeypatch, no_data_env):
    def offline(url, timeout=None):
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    file = INFILLING_FILES["multi-line"]
    with pytest.raises(BenchmarkUnavailable) as err:
        load_infilling_tasks("multi-line")
    message = str(err.value)
    assert "\n" not in message
    for needed in (file.url, file.sha256, "--data_dir", DATA_ENV, "Network is unreachable"):
        assert needed in message
    assert not [p for p in no_data_env.rglob("*") if p.is_file()]  # nothing half-written is left


def test_a_download_is_verified_then_cached(monkeypatch, no_data_env):
    by_url = {f.url: (data_dir() / f.group / f.name).read_bytes() for f in ALL_FILES}
    asked = _serve(monkeypatch, by_url.__getitem__)
    first = load_mbpp("full")
    second = load_mbpp("full")
    assert asked == [MBPP_FILES["full"].url]  # the second load reads the cache
    assert first.path == second.path == no_data_env / "mbpp" / "mbpp.jsonl"
    assert first.tasks == second.tasks and len(first.tasks) == 974


def test_a_download_with_other_bytes_is_refused_and_not_cached(monkeypatch, no_data_env):
    _serve(monkeypatch, lambda url: b"<html>rate limited</html>")
    with pytest.raises(ValueError, match="not the pinned"):
        load_infilling_tasks("random-span-light")
    assert not any(no_data_env.rglob("*.gz")) and not any(no_data_env.rglob("*.partial"))


def test_a_cached_file_that_changed_is_refused(monkeypatch, no_data_env):
    file = INFILLING_FILES["random-span-light"]
    cached = no_data_env / file.group / file.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(gzip.compress(b"{}\n"))
    with pytest.raises(ValueError, match=f"{cached}: SHA-256"):
        load_infilling_tasks("random-span-light")


# -- parsed task sets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "size"),
    [("single-line", 1033), ("multi-line", 5815), ("random-span", 1640), ("random-span-light", 164)],
)
def test_infilling_sets_have_the_published_tasks(mode, size):
    task_set = load_infilling_tasks(mode, data_dir())
    assert len(task_set.tasks) == size == len({t.task_id for t in task_set.tasks})
    problems = load_problems()
    assert {t.problem_id for t in task_set.tasks} == set(problems)  # every HumanEval problem has tasks
    assert all(t.entry_point == problems[t.problem_id]["entry_point"] for t in task_set.tasks)
    meta = task_set.meta()
    assert meta["sha256"] == INFILLING_FILES[mode].sha256 and meta["num_tasks"] == size
    assert meta["name"] == INFILLING_FILES[mode].name.removesuffix(".jsonl.gz")
    with gzip.open(task_set.path, "rt") as f:  # the fields are the file's, untouched
        first = json.loads(f.readline())
    t = task_set.tasks[0]
    assert (t.task_id, t.prefix, t.middle, t.suffix, t.test) == (
        first["task_id"], first["prompt"], first["canonical_solution"], first["suffix"], first["test"],
    )  # fmt: skip


def test_unknown_infilling_set_names_the_known_ones():
    with pytest.raises(ValueError, match="single-line, multi-line, random-span, random-span-light"):
        load_infilling_tasks("whole-file")


@pytest.mark.parametrize(("variant", "size", "scored"), [("sanitized", 427, 257), ("full", 974, 500)])
def test_mbpp_files_parse_whole_and_split_on_task_ids(variant, size, scored):
    task_set = load_mbpp(variant, data_dir())
    assert len(task_set.tasks) == size and task_set.meta()["sha256"] == MBPP_FILES[variant].sha256
    split = evaluation_split(task_set.tasks)
    assert len(split) == scored
    assert all(11 <= p.task_id <= 510 for p in split)
    assert not {p.task_id for p in split} & set(MBPP_FEWSHOT_IDS)


def test_sanitized_test_imports_become_the_test_setup():
    problems = {p.task_id: p for p in load_mbpp("sanitized", data_dir()).tasks}
    rows = {r["task_id"]: r for r in json.loads((data_dir() / "mbpp" / "sanitized-mbpp.json").read_text())}
    with_imports = [i for i, r in rows.items() if r["test_imports"]]
    assert with_imports  # the file has some (math.isclose asserts)
    for i in with_imports:
        assert problems[i].test_setup.splitlines() == rows[i]["test_imports"]


def test_prefetch_prints_every_file(capsys, no_data_env):
    benchmarks.main(["--data_dir", str(data_dir())])
    printed = capsys.readouterr().out.split()
    assert len(printed) == len(ALL_FILES)
    assert all(p.endswith(f.name) for p, f in zip(printed, ALL_FILES, strict=True))
