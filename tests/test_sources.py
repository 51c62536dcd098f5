from __future__ import annotations

import gzip
import json
import os
import sysconfig
from pathlib import Path

import pytest

from codetune.data.sources import CodeFiles, HFDataset, JsonlFiles, ParquetFiles

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


# --- CodeFiles on real stdlib files ---------------------------------------------------------------


def test_stdlib_subtree_yields_every_python_file_with_its_exact_text():
    source = CodeFiles("@stdlib", include=["json/**/*.py"])
    docs = list(source.documents())
    expected = sorted(
        p.relative_to(STDLIB).as_posix()
        for p in (STDLIB / "json").rglob("*.py")
        if "__pycache__" not in p.parts
    )
    assert [d.doc_id for d in docs] == expected
    for doc in docs:
        assert doc.text == (STDLIB / doc.doc_id).read_text(encoding="utf-8")
        assert doc.source == "code" and doc.meta["language"] == "python"


def test_stdlib_excludes_site_packages_and_pycache():
    source = CodeFiles("@stdlib", include=["**"], max_line_length=None)
    ids = [d.doc_id for d in source.documents()]
    assert ids and not any(i.startswith("site-packages/") or "__pycache__" in i.split("/") for i in ids)
    assert ids == sorted(ids)  # os.walk order is the file system's, not sorted


def test_include_and_exclude_globs_select_files():
    top_level = {d.doc_id for d in CodeFiles("@stdlib", include=["json/*.py"]).documents()}
    assert top_level == {f"json/{p.name}" for p in (STDLIB / "json").glob("*.py")}
    without_tool = {
        d.doc_id for d in CodeFiles("@stdlib", include=["json/*.py"], exclude=["**/tool.py"]).documents()
    }
    assert without_tool == top_level - {"json/tool.py"}


def test_max_files_is_a_stable_sample_in_sorted_order():
    small = [d.doc_id for d in CodeFiles("@stdlib", max_files=5).documents()]
    again = [d.doc_id for d in CodeFiles("@stdlib", max_files=5).documents()]
    larger = [d.doc_id for d in CodeFiles("@stdlib", max_files=12).documents()]
    assert small == again == sorted(small) and len(small) == 5 and len(larger) == 12
    assert set(small) <= set(larger)  # the sample grows, it is not redrawn
    assert len({i.split("/")[0] for i in larger}) > 1  # spread over the tree, not the first folder


def test_metadata_prefix_is_a_comment_in_the_files_language(tmp_path):
    _write(tmp_path / "pkg/a.py", "x = 1\n")
    _write(tmp_path / "src/b.c", "int x;\n")
    docs = {d.doc_id: d for d in CodeFiles(str(tmp_path), include=["**/*"], metadata_prefix=True).documents()}
    assert docs["pkg/a.py"].text == "# pkg/a.py\nx = 1\n"
    assert docs["src/b.c"].text == "// src/b.c\nint x;\n"


def test_language_filter_keeps_only_requested_languages_and_counts_the_rest(tmp_path):
    _write(tmp_path / "a.py", "x = 1\n")
    _write(tmp_path / "b.c", "int x;\n")
    _write(tmp_path / "c.rs", "fn main() {}\n")
    source = CodeFiles(str(tmp_path), include=["*"], languages=["c", "rust"])
    assert [d.doc_id for d in source.documents()] == ["b.c", "c.rs"]
    assert source.skipped.counts == {"language": 1}


def test_unknown_language_is_rejected_up_front():
    with pytest.raises(ValueError, match="cobol"):
        CodeFiles("@stdlib", languages=["cobol"])


# --- CodeFiles skip reasons -----------------------------------------------------------------------


def test_each_unusable_file_is_skipped_and_counted_under_its_reason(tmp_path):
    _write(tmp_path / "good.py", "def f():\n    return 1\n")
    _write(tmp_path / "binary.py", b"x = 1\n\x00\x01\x02")
    _write(tmp_path / "latin1.py", "s = 'café'\n".encode("latin-1"))
    _write(tmp_path / "empty.py", b"")
    _write(tmp_path / "blank.py", "\n   \n")
    _write(tmp_path / "long.py", "x = '" + "a" * 50 + "'\n")
    _write(tmp_path / "huge.py", "y = 2\n" * 20)
    os.symlink(tmp_path / "missing-target.py", tmp_path / "dangling.py")
    source = CodeFiles(str(tmp_path), max_line_length=40, max_bytes=100)
    assert [d.doc_id for d in source.documents()] == ["good.py"]
    assert source.skipped.counts == {
        "binary": 1,
        "not_utf8": 1,
        "empty": 2,
        "long_line": 1,
        "too_large": 1,
        "unreadable": 1,
    }
    assert source.skipped.examples["not_utf8"] == ["latin1.py"]


def test_counts_reset_on_each_pass(tmp_path):
    _write(tmp_path / "good.py", "x = 1\n")
    _write(tmp_path / "empty.py", "")
    source = CodeFiles(str(tmp_path))
    list(source.documents())
    list(source.documents())
    assert source.skipped.counts == {"empty": 1}


def test_unreadable_file_raises_when_asked(tmp_path):
    _write(tmp_path / "good.py", "x = 1\n")
    os.symlink(tmp_path / "nowhere.py", tmp_path / "dangling.py")
    with pytest.raises(OSError, match="dangling.py"):
        list(CodeFiles(str(tmp_path), on_error="raise").documents())


def test_min_bytes_skips_small_files(tmp_path):
    _write(tmp_path / "small.py", "x=1\n")
    _write(tmp_path / "big.py", "value = 12345\n")
    source = CodeFiles(str(tmp_path), min_bytes=10)
    assert [d.doc_id for d in source.documents()] == ["big.py"]
    assert source.skipped.counts == {"too_small": 1}


def test_missing_path_is_a_one_line_file_not_found_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope") as err:
        list(CodeFiles(str(missing)).documents())
    assert "\n" not in str(err.value)


def test_source_with_nothing_left_after_filtering_names_path_filters_and_counts(tmp_path):
    _write(tmp_path / "empty.py", "")
    _write(tmp_path / "long.py", "a" * 2000 + "\n")
    with pytest.raises(ValueError) as err:
        list(CodeFiles(str(tmp_path)).documents())
    message = str(err.value)
    assert (
        str(tmp_path) in message
        and "**/*.py" in message
        and "empty=1" in message
        and "long_line=1" in message
    )
    assert "\n" not in message


# --- JSONL ----------------------------------------------------------------------------------------


def _jsonl(path: Path, lines: list[str]) -> Path:
    return _write(path, "".join(line + "\n" for line in lines))


def test_jsonl_yields_texts_with_file_line_ids(tmp_path):
    records = [{"text": f"def f{i}(): pass\n"} for i in range(3)]
    path = _jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in records] + [""])
    docs = list(JsonlFiles(str(path)).documents())
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert [d.doc_id for d in docs] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"]


def test_jsonl_malformed_line_raises_with_path_and_line(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", ['{"text": "ok"}', '{"text": "ok"}', '{"text": broken'])
    with pytest.raises(ValueError, match=f"{path}:3") as err:
        list(JsonlFiles(str(path)).documents())
    assert "on_error" in str(err.value)


def test_jsonl_skip_counts_bad_lines_and_keeps_good_ones(tmp_path):
    path = _jsonl(
        tmp_path / "a.jsonl",
        [
            '{"text": "one"}',
            "{oops",
            '{"content": "no text"}',
            "[1, 2]",
            '{"text": 5}',
            '{"text": "  "}',
            '{"text": "two"}',
        ],
    )
    source = JsonlFiles(str(path), on_error="skip")
    assert [d.text for d in source.documents()] == ["one", "two"]
    assert source.skipped.counts == {"malformed_json": 1, "missing_text": 2, "not_an_object": 1, "empty": 1}
    assert source.skipped.examples["malformed_json"] == [f"{path}:2"]
    # every skipped location is kept for the run's skipped.jsonl, not only the examples
    assert [where for _, where in source.skipped.listed] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]


def test_jsonl_whose_text_is_under_another_key_suggests_text_field(tmp_path):
    """``content`` instead of ``text`` (issue 14 #8): the message says which field to set, not just missing_text."""
    record = {"path": "a.py", "content": "def f():\n    return 1\n"}
    path = _jsonl(tmp_path / "code.jsonl", [json.dumps(record)] * 3)
    with pytest.raises(ValueError, match="set text_field: content"):
        list(JsonlFiles(str(path)).documents())
    with pytest.raises(ValueError, match=r"missing_text=3 .*; missing_text: .*set text_field: content"):
        list(JsonlFiles(str(path), on_error="skip").documents())


def test_jsonl_folder_glob_gzip_and_id_field(tmp_path):
    _jsonl(tmp_path / "d/b.jsonl", [json.dumps({"text": "b", "id": "B"})])
    (tmp_path / "d/sub").mkdir()
    with gzip.open(tmp_path / "d/sub/a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "a", "id": "A"}) + "\n")
    from_dir = list(JsonlFiles(str(tmp_path / "d"), id_field="id").documents())
    assert [(d.text, d.doc_id) for d in from_dir] == [
        ("b", "B"),
        ("a", "A"),
    ]  # sorted: b.jsonl < sub/a.jsonl.gz
    from_glob = list(JsonlFiles(str(tmp_path / "d/**/*.jsonl*")).documents())
    assert [d.doc_id for d in from_glob] == ["d/b.jsonl:1", "d/sub/a.jsonl.gz:1"]


def test_jsonl_file_that_is_not_utf8_is_named_or_counted(tmp_path):
    _jsonl(tmp_path / "a.jsonl", ['{"text": "fine"}'])
    _write(tmp_path / "b.jsonl", '{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="b.jsonl"):
        list(JsonlFiles(str(tmp_path)).documents())
    source = JsonlFiles(str(tmp_path), on_error="skip")
    assert [d.text for d in source.documents()] == ["fine"]
    assert source.skipped.counts == {"not_utf8_file": 1}


def test_jsonl_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        list(JsonlFiles(str(tmp_path / "absent.jsonl")).documents())


# --- Parquet --------------------------------------------------------------------------------------


def test_parquet_round_trip_in_small_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"print({i})\n" for i in range(10)]
    pq.write_table(pa.table({"content": texts, "n": list(range(10))}), tmp_path / "code.parquet")
    docs = list(ParquetFiles(str(tmp_path / "code.parquet"), text_field="content", batch_size=3).documents())
    assert [d.text for d in docs] == texts
    assert [d.doc_id for d in docs] == [f"code.parquet:{i}" for i in range(10)]
    with_ids = list(ParquetFiles(str(tmp_path), text_field="content", id_field="n").documents())
    assert [d.doc_id for d in with_ids] == [str(i) for i in range(10)]


def test_parquet_null_text_raises_or_is_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="x.parquet:1"):
        list(ParquetFiles(str(tmp_path / "x.parquet")).documents())
    source = ParquetFiles(str(tmp_path / "x.parquet"), on_error="skip")
    assert [d.text for d in source.documents()] == ["a", "b"]
    assert source.skipped.counts == {"null_field": 1, "empty": 1}


def test_parquet_corrupt_file_is_named_or_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ok"]}), tmp_path / "a.parquet")
    _write(tmp_path / "b.parquet", b"not parquet at all")
    with pytest.raises(ValueError, match="b.parquet"):
        list(ParquetFiles(str(tmp_path)).documents())
    source = ParquetFiles(str(tmp_path), on_error="skip")
    assert [d.text for d in source.documents()] == ["ok"]
    assert source.skipped.counts == {"unreadable_file": 1}


def test_parquet_missing_column_lists_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no column 'text'.*content"):
        list(ParquetFiles(str(tmp_path / "x.parquet")).documents())


# --- datasets -------------------------------------------------------------------------------------


def test_hf_dataset_from_save_to_disk_plain_and_streaming(tmp_path):
    import datasets

    texts = [f"x = {i}\n" for i in range(7)]
    datasets.Dataset.from_dict({"code": texts, "extra": list(range(7))}).save_to_disk(str(tmp_path / "ds"))
    plain = list(HFDataset(str(tmp_path / "ds"), text_field="code").documents())
    streamed = list(HFDataset(str(tmp_path / "ds"), text_field="code", streaming=True).documents())
    assert [d.text for d in plain] == [d.text for d in streamed] == texts
    assert [d.doc_id for d in plain] == [f"train:{i}" for i in range(7)]


def test_hf_dataset_dict_picks_the_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
            "test": datasets.Dataset.from_dict({"text": ["c"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [d.text for d in HFDataset(str(tmp_path / "dd"), split="test").documents()] == ["c"]
    with pytest.raises(ValueError, match="validation.*train"):
        list(HFDataset(str(tmp_path / "dd"), split="validation").documents())


def test_hf_dataset_local_jsonl_files_streaming(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": t}) for t in ["p", "q", " "]])
    source = HFDataset(str(tmp_path / "a.jsonl"), streaming=True)
    assert [d.text for d in source.documents()] == ["p", "q"]
    assert source.skipped.counts == {"empty": 1}


def test_hf_dataset_local_parquet_files_with_own_cache(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "k": ["x", "y"]}), tmp_path / "p.parquet")
    source = HFDataset(str(tmp_path / "p.parquet"), id_field="k", cache_dir=str(tmp_path / "cache"))
    assert [(d.text, d.doc_id) for d in source.documents()] == [("a", "x"), ("b", "y")]
    assert any((tmp_path / "cache").iterdir())


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="would try the network")
def test_hf_dataset_hub_name_offline_explains_the_lookup(tmp_path):
    with pytest.raises(Exception) as err:  # datasets' own error type; the note is ours
        list(HFDataset("nobody-xyz/no-such-dataset", cache_dir=str(tmp_path)).documents())
    assert any("Hugging Face Hub" in note for note in getattr(err.value, "__notes__", []))


def test_hf_dataset_missing_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"code": ["a"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="no column 'text'.*code"):
        list(HFDataset(str(tmp_path / "ds")).documents())


# --- recipe schema --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "config"),
    [
        (CodeFiles, {"path": "@stdlib", "include": ["json/*.py"], "max_files": 2}),
        (JsonlFiles, {"path": "x.jsonl", "on_error": "skip"}),
        (ParquetFiles, {"path": "x.parquet", "text_field": "content"}),
        (HFDataset, {"path": "org/name", "streaming": True}),
    ],
)
def test_sources_parse_from_a_recipe(cls, config):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--source", type=cls)
    parsed = parser.parse_object({"source": config})
    source = parser.instantiate_classes(parsed).source
    assert isinstance(source, cls)
    assert {k: getattr(source, k) for k in config} == config
