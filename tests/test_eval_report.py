"""Scores carry what they were measured on, and `codetune eval report` lines runs up only where that is equal."""

from __future__ import annotations

import json
import logging

import pytest

from codetune.cli import main
from codetune.commands.evaluate import eval_report, run_task
from codetune.eval import infilling as inf
from codetune.eval.report import read_scores
from tests.benchmark_data import data_dir


def _infilling_result(run, tasks: str, exact: float, limit: int | None = None):
    """Write an infilling results file the way `codetune eval infilling` does, with the task metadata the real
    task selection returns, and made-up scores (nothing is generated)."""
    selected, meta = inf.select_tasks(tasks, "single-line", str(data_dir()), limit, seed=0, per_problem=1)
    settings = {"tasks": tasks, "mode": "single-line", "format": "psm", "limit": limit, "per_problem": 1}
    settings |= {"max_new_tokens": 64, "timeout": 3.0}

    def work(model, tokenizer):
        records = [{"task_id": t.task_id} for t in selected]
        return (
            {"pass@1": exact / 2, "exact_match": exact},
            records,
            {"seed": 0, "task_set": meta.get("task_set")},
        )

    benchmark = "humaneval-infilling-single-line" + ("" if tasks == "official" else "-derived")
    return run_task(
        "infilling", benchmark, None, str(run / "eval" / tasks), settings, work, loaded=(None, None)
    )


def _humaneval_result(run, temperature: float, n: int, value: float):
    settings = {
        "k": [1],
        "n": n,
        "temperature": temperature,
        "top_p": 0.95,
        "max_new_tokens": 128,
        "chat": False,
    }
    settings["limit"] = None

    def work(model, tokenizer):
        return {"pass@1": value}, [{"task_id": i} for i in range(164)], {"seed": 0}

    return run_task(
        "humaneval", "humaneval", None, str(run / "eval" / "he"), settings, work, loaded=(None, None)
    )


def test_each_score_names_its_task_set_size_and_decoding(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _infilling_result(tmp_path / "a", "official", 0.5, limit=7)
    _humaneval_result(tmp_path / "a", 0.8, 10, 0.25)
    scores = {(s.benchmark, s.metric): s for s in read_scores(tmp_path / "a")}

    official = scores["humaneval-infilling-single-line", "exact_match"]
    assert (
        official.task_set.startswith("HumanEval-SingleLineInfilling.jsonl")
        and "sha256 1277073e7ddc" in official.task_set
    )
    assert "first 7 only" in official.task_set and official.num_tasks == 7
    assert official.decoding.startswith("greedy") and "PSM" in official.decoding
    sampled = scores["humaneval", "pass@1"]
    assert sampled.num_tasks == 164 and "T=0.8" in sampled.decoding and "n=10" in sampled.decoding
    # The eval summary in the log says the same.
    assert "exact_match = 0.5 on 7 tasks of HumanEval-SingleLineInfilling" in caplog.text


def test_report_lines_up_only_comparable_scores(tmp_path):
    for run, exact in (("base", 0.25), ("tuned", 0.75)):
        _infilling_result(tmp_path / run, "official", exact)
    _infilling_result(tmp_path / "tuned", "derived", 0.9)  # other tasks: a row of its own
    _humaneval_result(tmp_path / "base", 0.0, 1, 0.1)

    table = eval_report([str(tmp_path / "base"), str(tmp_path / "tuned")]).splitlines()
    assert table[0] == "| benchmark | task set | tasks | decoding | metric | base | tuned |"
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:5]): line for line in table[2:]}
    by_metric = {(key[0], key[4]): line.strip("|").split("|")[5:] for key, line in rows.items()}
    official = by_metric["humaneval-infilling-single-line", "exact_match"]
    assert [c.strip() for c in official] == ["0.25", "0.75"]
    derived = by_metric["humaneval-infilling-single-line-derived", "exact_match"]
    assert [c.strip() for c in derived] == ["—", "0.9"]
    assert [c.strip() for c in by_metric["humaneval", "pass@1"]] == ["0.1", "—"]
    assert len(rows) == 5  # official pass@1/exact, derived pass@1/exact, humaneval pass@1


def test_report_from_the_command_line(tmp_path, capsys):
    _humaneval_result(tmp_path / "x", 0.0, 1, 0.5)
    _humaneval_result(tmp_path / "y", 0.0, 1, 0.75)
    out = tmp_path / "table.md"
    main(["eval", "report", str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| x | y |" in printed and "| 0.5 | 0.75 |" in printed
    assert out.read_text().strip() == printed.strip()
    with pytest.raises(SystemExit, match="exists: choose another --out or pass --overwrite"):
        main(["eval", "report", str(tmp_path / "x"), "--out", str(out)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no \\*_results.json with scores"):
        main(["eval", "report", str(tmp_path / "empty")])


def test_unreadable_results_file_is_named_and_skipped(tmp_path, caplog):
    _humaneval_result(tmp_path / "r", 0.0, 1, 0.5)
    (tmp_path / "r" / "eval" / "broken_results.json").write_text("{not json")
    scores = read_scores(tmp_path / "r")
    assert [s.value for s in scores] == [0.5]
    assert "broken_results.json" in caplog.text
    assert (
        json.loads((tmp_path / "r" / "eval" / "he" / "humaneval_results.json").read_text())["num_tasks"]
        == 164
    )
