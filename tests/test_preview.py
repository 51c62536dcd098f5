"""`codetune preview` writes exactly the rows the train loader yields, and builds no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codetune.cli import main
from codetune.commands.fit import CodetuneCLI
from codetune.commands.preview import preview

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
TINY = [
    "--data.init_args.seq_len=128",
    "--data.init_args.batch_size=4",
    '--data.init_args.sources=[{path: "@stdlib", name: stdlib, include: ["json/*.py", "*.py"], max_files: 30}]',
    "--data.init_args.tokenizer.train.max_files=60",
    "--data.init_args.tokenizer.train.vocab_size=1024",
]


@pytest.fixture(scope="module")
def previewed(tmp_path_factory):
    out = tmp_path_factory.mktemp("preview") / "rows.jsonl"
    result = preview(QUICKSTART, rows=10, out=str(out), overrides=TINY)
    return result, out


def test_preview_rows_are_the_first_rows_of_the_train_loader(previewed):
    result, out = previewed
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == result["rows"] and len(written) == 10
    cli = CodetuneCLI(args=["--config", QUICKSTART, *TINY], run=False)
    cli.datamodule.setup("fit")
    loader = cli.datamodule.train_dataloader()
    trained = []
    for batch in loader:
        for i in range(batch["input_ids"].shape[0]):
            trained.append({k: batch[k][i].tolist() for k in ("input_ids", "labels", "position_ids")})
        if len(trained) >= 10:
            break
    for row, expected in zip(written, trained, strict=False):
        assert {k: row[k] for k in expected} == expected


def test_preview_rows_describe_their_documents(previewed):
    result, _ = previewed
    fim_seen = False
    for row in result["rows"]:
        assert set(row) >= {"input_ids", "labels", "position_ids", "text", "documents"}
        spans = row["documents"]
        assert spans[0]["start"] == 0
        for span, following in zip(spans, spans[1:] + [None], strict=True):
            assert set(span) == {"source", "doc_id", "chunk", "start", "end", "fim"}
            assert row["position_ids"][span["start"]] == 0  # every span starts its own attention block
            assert span["fim"] in (None, "psm", "spm")
            fim_seen |= span["fim"] is not None
            if following is not None:
                assert following["start"] == span["end"]
        assert "<PRE>" in row["text"] or not any(s["fim"] for s in spans)
    assert fim_seen  # the quickstart trains with FIM


def test_preview_summary_reports_rates_shares_and_counts(previewed, capsys):
    result, _ = previewed
    summary = result["summary"]
    assert summary["rows"] == 10
    assert 0.9 < summary["real_token_fraction"] <= 1.0
    assert summary["token_shares"] == {"stdlib": 1.0}
    assert summary["fim_rate"] == pytest.approx(summary["psm_rate"] + summary["spm_rate"])
    overall = summary["all_train_rows"]
    assert 0.8 < overall["fim_rates"][0] < 0.97  # configured 0.9, per fragment (context level)
    assert "curation" in summary and "skipped" in summary


def test_preview_builds_no_model(tmp_path, monkeypatch):
    import codetune.model.build as loader
    from codetune.modules.causal import CausalLM

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("preview loaded a model"))
    monkeypatch.setattr(CausalLM, "__init__", lambda *a, **k: pytest.fail("preview built the module"))
    result = preview(QUICKSTART, rows=2, overrides=TINY)
    assert len(result["rows"]) == 2


def test_codetune_preview_command_line(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    # Recipe keys as for `codetune fit` (`--key value` or `--key=value`), no JSON list to escape (issue 14 #11).
    flag, value = TINY[0].split("=", 1)
    main(["preview", "--config", QUICKSTART, "--rows", "3", "--out", str(out), flag, value, *TINY[1:]])
    assert len(out.read_text().splitlines()) == 3
    err = capsys.readouterr().err
    assert "real-token fraction" in err and "FIM spans" in err and "curation:" in err


def test_preview_of_a_missing_recipe_is_a_one_line_error():
    with pytest.raises(SystemExit, match="no/such.yaml: no such file"):
        main(["preview", "--config", "no/such.yaml"])
