"""The git source: exactly the tracked text files at a commit, every skip counted by reason, one-line errors."""

from __future__ import annotations

import pytest

from codetune.data.git import GitError, GitRepos
from tests import repos


def test_reads_exactly_the_tracked_text_files_at_head_and_counts_every_skip(git_repos):
    source = GitRepos(str(git_repos["mixed"]), max_bytes=4096)
    docs = {d.meta["path"]: d for d in source.documents()}
    # Ignored, untracked, vendored, binary, generated, ... files never appear; committed content, not the work tree.
    assert sorted(docs) == sorted([*repos.TRACKED_TEXT, ".gitignore"])
    for path, text in repos.TRACKED_TEXT.items():
        assert docs[path].text == text
    assert source.skipped.counts == repos.MIXED_SKIPS
    assert "mixed/logo.png" in source.skipped.examples["binary"]
    doc = docs["app/util.py"]
    assert doc.doc_id == "mixed/app/util.py" and doc.source == "repo"
    assert doc.meta["repo"] == "mixed" and doc.meta["language"] == "python" and len(doc.meta["commit"]) == 40
    assert docs["web/site.js"].meta["language"] == "javascript"


def test_a_pinned_commit_reads_that_commit(git_repos):
    source = GitRepos(str(git_repos["mixed"]), revision=git_repos["mixed_first"])
    docs = {d.meta["path"]: d.text for d in source.documents()}
    assert sorted(docs) == sorted(repos.TRACKED_TEXT)
    assert docs["app/util.py"] == "def twice(x):\n    return x + x\n"
    with pytest.raises(GitError, match="revision 'no-such-tag' is not a commit"):
        list(GitRepos(str(git_repos["mixed"]), revision="no-such-tag").documents())


def test_languages_vendored_and_excluded_are_counted(git_repos):
    source = GitRepos(str(git_repos["mixed"]), languages=["python"], vendored=[], exclude=["app/main.py"])
    paths = [d.meta["path"] for d in source.documents()]
    assert paths == ["app/util.py", "data.py", "vendor/lib.py"]
    assert source.skipped.counts["excluded"] == 1 and "vendored" not in source.skipped.counts
    assert source.skipped.counts["language"] >= 4  # README.md, .gitignore, site.js, the JavaScript files, ...


def test_a_folder_of_repositories_and_a_folder_inside_one(git_repos):
    root = git_repos["package"].parent
    names = {d.meta["repo"] for d in GitRepos(str(root), languages=["python"]).documents()}
    assert names == {"mixed", "pkgrepo", "json"}
    inside = GitRepos(str(git_repos["package"] / "pkg" / "core")).documents()
    assert [d.meta["path"] for d in inside] == ["pkg/core/base.py"]


def test_bad_input_is_one_clear_line(git_repos, monkeypatch):
    with pytest.raises(GitError, match="is not a git repository.*plain_folder: true"):
        GitRepos(str(git_repos["plain"])).repositories()
    plain = list(GitRepos(str(git_repos["plain"]), plain_folder=True).documents())
    assert [(d.meta["path"], d.text) for d in plain] == [("x.py", "X = 1\n")]
    with pytest.raises(GitError, match="has no commits"):
        list(GitRepos(str(git_repos["empty"])).documents())
    with pytest.raises(ValueError, match=r"no usable files in skipped.*binary=1.*lock=1"):
        list(GitRepos(str(git_repos["skipped"])).documents())
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(GitError, match="no `git` executable on PATH"):
        GitRepos(str(git_repos["mixed"])).repositories()


def test_the_cache_fingerprint_is_the_commit(git_repos):
    source = GitRepos(str(git_repos["mixed"]))
    (entry,) = source.fingerprint()
    assert entry[0] == "mixed" and entry[-1] == repos.git(git_repos["mixed"], "rev-parse", "HEAD")


def test_the_data_module_trains_on_repository_documents_and_reports_the_skips(git_repos, tokenizer_spec):
    from codetune.data.datamodule import CodeDataModule
    from codetune.data.fim import FIMConfig
    from codetune.data.repository import layout_pieces

    source = GitRepos(str(git_repos["mixed"]), max_bytes=4096, name="mine")
    dm = CodeDataModule(
        tokenizer=tokenizer_spec, sources=[source], seq_len=256, batch_size=2, fim=FIMConfig(fim_rate=1.0)
    )
    dm.setup("fit")
    lines = "\n".join(dm.summary_lines())
    assert "source mine: skipped binary=1" in lines and "submodule=1" in lines and "not_utf8=1" in lines
    spans = [span for i in range(len(dm.train_rows)) for span in dm.train_rows.documents(i)]
    assert spans and all(span["doc_id"].startswith("mixed#") for span in spans)
    assert any(span["fim"] in ("psm", "spm") for span in spans)
    # The documents the corpus holds are the repository's files with their headers, split side by side.
    table = dm.corpus.dataset
    files = []
    for text, layout in zip(table["text"], table["layout"], strict=True):
        pieces = layout_pieces(text, layout)
        assert "".join(p for _, p in pieces) == text
        files += [p.split(" mixed/", 1)[1].strip() for k, p in pieces if k == 0 and " mixed/" in p]
    assert sorted(files) == sorted([*repos.TRACKED_TEXT, ".gitignore"])


TINY_TOKENIZER = "--data.init_args.tokenizer={train: {corpus: '@stdlib', vocab_size: 1024, max_files: 60}, name_or_path: null}"


def json_source_override(git_repos) -> str:
    return (
        "--data.init_args.sources=[{class_path: codetune.data.git.GitRepos, "
        f"init_args: {{path: '{git_repos['json']}', name: repo}}}}]"
    )


def test_preview_shows_the_file_boundaries_of_repository_documents(git_repos, capsys):
    from codetune.commands.preview import preview
    from tests.conftest import REPO

    recipe = str(REPO / "recipes" / "tiny-repo-fim.yaml")
    result = preview(recipe, rows=2, overrides=[TINY_TOKENIZER, json_source_override(git_repos)])
    printed = capsys.readouterr().err
    assert "repository documents (files in order, as their headers read):" in printed
    spans = [s for r in result["rows"] for s in r["documents"]]
    assert any(f["path"].startswith("# json/") for s in spans for f in s["files"])
    for row in result["rows"]:
        for span in row["documents"]:
            for f in span.get("files", []):  # each boundary points at its header in the row's text
                assert row["text"][f["at"] :].startswith(f["path"])
    assert "skipped" in result["summary"] and "row 0 json#" in printed
