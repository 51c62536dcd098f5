"""Repository-level documents: dependency order, the base's repository tokens, repository-level FIM round trips."""

from __future__ import annotations

import random

import pytest

from codetune.data.fim import FIMConfig, FIMTransform, draw
from codetune.data.repository import (
    BODY,
    TOKEN,
    RepositoryAssembler,
    dependency_order,
    encode_pieces,
    import_graph,
    layout_pieces,
    repo_tokens,
)
from codetune.data.sources import Document
from codetune.data.tokenizer import TokenizerSpec, backend_copy, build_tokenizer
from tests import repos
from tests.vocabularies import vocabulary


def _files(texts: dict[str, str], repo: str = "pkgrepo", split: str = "train") -> list[Document]:
    return [
        Document(t, f"{repo}/{p}", "repo", {"repo": repo, "path": p, "split": split})
        for p, t in sorted(texts.items())
    ]


@pytest.fixture(scope="module")
def starcoder2():
    return build_tokenizer(TokenizerSpec(name_or_path=str(vocabulary("starcoder"))))


def _check_order(texts: dict[str, str], order: list[str], root_package: str | None = None) -> None:
    graph = import_graph(texts, root_package)
    position = {p: i for i, p in enumerate(order)}
    assert sorted(order) == sorted(texts)
    for path, deps in graph.items():
        for dep in deps:
            if path not in graph[dep]:  # outside a two-file cycle, the dependency comes first
                assert position[dep] < position[path], (dep, path)


def test_every_file_comes_after_the_files_it_imports_and_the_order_is_stable():
    order = dependency_order(repos.PACKAGE)
    _check_order(repos.PACKAGE, order)
    assert order.index("pkg/core/base.py") < order.index("pkg/models.py") < order.index("pkg/views.py")
    assert order.index("pkg/views.py") < order.index("pkg/app.py") < order.index("pkg/__init__.py")
    # The cycle a <-> b is broken in path order; c, which imports b, follows both.
    assert order.index("pkg/a.py") + 1 == order.index("pkg/b.py") < order.index("pkg/c.py")
    shuffled = list(repos.PACKAGE.items())
    random.Random(0).shuffle(shuffled)
    assert dependency_order(dict(shuffled)) == order
    # Files with no imports between them (and other languages) keep path order.
    assert order[0] == "docs/index.md" and order[-1] == "tools/run.sh"


def test_the_json_package_in_dependency_order():
    texts = {n: (repos.STDLIB / "json" / n).read_text() for n in repos.JSON_FILES}
    order = dependency_order(texts, "json")
    _check_order(texts, order, "json")
    assert (
        order.index("scanner.py")
        < order.index("decoder.py")
        < order.index("__init__.py")
        < order.index("tool.py")
    )


def test_plain_headers_without_repository_tokens(tokenizer):
    assert repo_tokens(tokenizer) is None
    assembler = RepositoryAssembler(backend_copy(tokenizer, text_only=True), None, {"repo": 10_000})
    (doc,) = assembler.run(_files(repos.PACKAGE))
    order = dependency_order(repos.PACKAGE, "pkgrepo")
    expected = "".join(
        f"# pkgrepo/{p}\n" + repos.PACKAGE[p] + ("" if repos.PACKAGE[p].endswith("\n") else "\n")
        for p in order
    )
    assert doc.text == expected
    assert doc.meta["files"] == order
    pieces = layout_pieces(doc.text, doc.meta["layout"])
    assert "".join(p for _, p in pieces) == doc.text
    assert [p for k, p in pieces if k == BODY] == [repos.PACKAGE[p] for p in order if repos.PACKAGE[p]]
    assert doc.text.startswith("# pkgrepo/docs/index.md\n# pkg\n# pkgrepo/pkg/a.py\n")


def test_a_token_budget_splits_a_repository_and_sides_never_mix(tokenizer):
    assembler = RepositoryAssembler(backend_copy(tokenizer, text_only=True), None, {"repo": 40})
    train = {p: t for p, t in repos.PACKAGE.items() if p != "pkg/views.py"}
    docs = list(
        assembler.run(
            [*_files(train), *_files({"pkg/views.py": repos.PACKAGE["pkg/views.py"]}, split="validation")]
        )
    )
    assert len([d for d in docs if d.meta["split"] == "train"]) > 1
    (held_out,) = [d for d in docs if d.meta["split"] == "validation"]
    assert held_out.meta["files"] == ["pkg/views.py"]
    files = [f for d in docs if d.meta["split"] == "train" for f in d.meta["files"]]
    assert files == dependency_order(train, "pkgrepo")  # chunks keep the order, each file once
    for d in docs:
        ids, _ = encode_pieces(assembler.tokenizer, layout_pieces(d.text, d.meta["layout"]))
        assert len(d.meta["files"]) == 1 or len(ids) + 2 <= 40


def test_starcoder2_repository_tokens_are_single_tokens(starcoder2):
    tokens = repo_tokens(starcoder2)
    assert (tokens.repo_name, tokens.file_sep) == ("<repo_name>", "<file_sep>")
    vocab = starcoder2.get_vocab()
    texts = {"a.py": "x = '<file_sep>'\n", "b.py": "from a import x\n"}
    assembler = RepositoryAssembler(backend_copy(starcoder2, text_only=True), tokens, {"repo": 1000})
    (doc,) = assembler.run(_files(texts, repo="r"))
    assert doc.text == "<repo_name>r<file_sep>a.py\nx = '<file_sep>'\n<file_sep>b.py\nfrom a import x\n"
    ids, offsets = encode_pieces(assembler.tokenizer, layout_pieces(doc.text, doc.meta["layout"]))
    # The repository and file tokens are their single ids; the literal `<file_sep>` in the code stays text.
    assert ids[0] == vocab["<repo_name>"] and ids.count(vocab["<file_sep>"]) == 2
    assert starcoder2.decode(ids) == doc.text
    assert [k for k, _ in layout_pieces(doc.text, doc.meta["layout"])].count(TOKEN) == 3
    assert offsets[-1][1] == len(doc.text)


@pytest.mark.parametrize("vocab", ["trained", "starcoder2"])
def test_repository_fim_unpermutes_to_the_files_with_their_headers(vocab, tokenizer, request):
    tok = tokenizer if vocab == "trained" else request.getfixturevalue("starcoder2")
    tokens = repo_tokens(tok)
    assembler = RepositoryAssembler(backend_copy(tok, text_only=True), tokens, {"repo": 10_000})
    (doc,) = assembler.run(_files(repos.PACKAGE))
    fim = FIMTransform(FIMConfig(fim_rate=1.0, spm_rate=0.5), tok)
    pieces = layout_pieces(doc.text, doc.meta["layout"])
    chosen_files, modes = set(), set()
    for ordinal in range(12):
        d = draw(fim.config, "repo", ordinal)
        enc = fim.encode_repository(doc.text, doc.meta["layout"], d, "repo", ordinal)
        ids = [*enc.input_ids, tok.eos_token_id]
        assert fim.unpermute_repository_ids(ids, tok.eos_token_id) == doc.text
        # Exactly one file is permuted: the ids before <PRE> are the untouched context files and header.
        start = enc.input_ids.index(fim.prefix_id)
        context = tok.decode(enc.input_ids[:start])
        assert doc.text.startswith(context) and context.endswith("\n")
        chosen_files.add(context.count("\n# pkgrepo/" if tokens is None else "<file_sep>"))
        middle = [i for i, m in zip(enc.input_ids, enc.middle_mask, strict=True) if m]
        assert middle[-1] == fim.end_id and enc.input_ids.count(fim.prefix_id) == 1
        modes.add(enc.mode)
    assert len(chosen_files) > 3 and modes == {"psm", "spm"}
    body_texts = [p for k, p in pieces if k == BODY]
    assert len(body_texts) == 10


def _draw_at(prefix_len: int, middle_len: int, total: int, mode: str):
    """A draw whose cuts fall exactly at ``prefix_len`` and ``prefix_len + middle_len`` of a ``total``-char file."""
    from codetune.data.fim import FIMDraw

    def cut(k: int) -> int:
        return -((-k << 64) // (total + 1))  # ceil(k * 2**64 / (total + 1))

    return FIMDraw(mode=mode, cut_a=cut(prefix_len), cut_b=cut(prefix_len + middle_len), window=0)


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_the_repository_infill_prompt_is_the_training_layout_up_to_the_middle(tokenizer, mode):
    from codetune.data.fim import draw_file
    from codetune.eval.infilling import RepoContext, build_infill_prompts, require_sentinels

    context = {"a/core.py": "def base():\n    return 1\n", "a/util.py": "X = 2\n"}
    edited, prefix, middle, suffix = "b/main.py", "def main():\n    return ", "base() + X", "\n"
    files = _files({**context, edited: prefix + middle + suffix}, repo="proj")
    assembler = RepositoryAssembler(backend_copy(tokenizer, text_only=True), None, {"repo": 10_000})
    (doc,) = assembler.run(files)
    assert doc.meta["files"][-1] == edited
    fim = FIMTransform(FIMConfig(fim_rate=1.0), tokenizer)
    ordinal = next(k for k in range(100) if draw_file(fim.config, "repo", k, 3) == 2)
    d = _draw_at(len(prefix), len(middle), len(prefix + middle + suffix), mode)
    enc = fim.encode_repository(doc.text, doc.meta["layout"], d, "repo", ordinal)
    trained_prompt = enc.input_ids[: enc.middle_mask.index(True)]
    (prompt,), _ = build_infill_prompts(
        tokenizer,
        [(prefix, suffix)],
        mode,
        require_sentinels(tokenizer),
        [RepoContext("proj", tuple(context.items()), edited)],
    )
    assert prompt == trained_prompt  # SPM: the prefix follows <MID>, in the prompt as in training
    assert tokenizer.decode(prompt).startswith("# proj/a/core.py\ndef base()")


def test_infill_context_files_come_in_dependency_order_with_repository_paths(git_repos):
    from codetune.commands.infill import repository_context

    root = git_repos["package"]
    context = repository_context(
        [str(root / "pkg/views.py"), str(root / "pkg/models.py"), str(root / "pkg/core/base.py")],
        str(root / "pkg/app.py"),
    )
    assert context.repo == "pkgrepo" and context.path == "pkg/app.py"
    assert [p for p, _ in context.files] == ["pkg/core/base.py", "pkg/models.py", "pkg/views.py"]
    assert context.files[0][1] == repos.PACKAGE["pkg/core/base.py"]
    with pytest.raises(FileNotFoundError, match="--context nope.py: no such file"):
        repository_context(["nope.py"], "x.py")


def test_api_infill_with_context_and_the_card_section(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    import codetune
    from codetune.data.tokenizer import fim_sentinels
    from codetune.exports.card import _repository_section

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    middle = codetune.infill(
        model,
        "def f():\n    return ",
        "\n",
        tokenizer=tokenizer,
        max_new_tokens=3,
        context={"u.py": "X = 1\n"},
    )
    assert isinstance(middle, str)

    class Facts:
        repository_level, repo_tokens = True, None

    section = "\n".join(_repository_section(Facts(), fim_sentinels(tokenizer)))
    assert "# myproject/text.py\nASCII = range(128)\n# myproject/clean.py\n<PRE>" in section


def _recipe_on(repo, tmp_path, val_fraction: float = 0.6):
    """recipes/tiny-repo-fim.yaml on a test repository, with the session's tokenizer (already trained)."""
    import yaml

    from tests.conftest import REPO

    recipe = yaml.safe_load((REPO / "recipes" / "tiny-repo-fim.yaml").read_text())
    data = recipe["data"]["init_args"]
    data["sources"][0]["init_args"]["path"] = str(repo)
    data["tokenizer"] = {"train": {"corpus": "@stdlib", "vocab_size": 1024, "max_files": 60}}
    data["split"]["val_fraction"] = val_fraction
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_held_out_files_are_scored_with_and_without_their_repository_context(
    git_repos, tiny_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    from codetune.commands.evaluate import evaluate_infilling, evaluate_perplexity
    from codetune.data.curation import split_of
    from codetune.eval.repository import context_perplexity, held_out_files

    recipe = _recipe_on(git_repos["json"], tmp_path)
    files = [
        Document((git_repos["json"] / n).read_text(), f"json/{n}", "repo", {"repo": "json", "path": n})
        for n in repos.JSON_FILES
    ]
    for d in files:
        d.meta["split"] = split_of(d, 0.6, 0)  # the recipe's split (seed 0), computed independently
    held = held_out_files(files)
    order = dependency_order({d.meta["path"]: d.text for d in files}, "json")
    assert [h.path for h in held] == [
        p for p in order if split_of(files[repos.JSON_FILES.index(p)], 0.6, 0) == "validation"
    ]
    assert all([d.meta["path"] for d in h.context] == order[: order.index(h.path)] for h in held)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = build_tokenizer(TokenizerSpec(name_or_path=str(tiny_model_dir)))
    first = held_out_files([dict_to_first(files, order)])
    alone = context_perplexity(model, tok, first, 256)  # nothing before it: both conditions are one prompt
    assert alone.with_context == alone.without_context and alone.context_files == 0
    results = evaluate_perplexity(
        str(tiny_model_dir), lengths=[256], recipe=str(recipe), out_dir=str(tmp_path / "ppl")
    )
    report = results["repository_context"]["256"]
    assert results["settings"]["held_out_files"] == len(held) == report["files"] and report["tokens"] > 0
    assert results["scores"]["perplexity@256_with_context"] > 1
    assert report["context_files"] > 0
    results = evaluate_infilling(
        str(tiny_model_dir), tasks="repository", recipe=str(recipe), limit=3, max_new_tokens=4,
        max_prompt_tokens=512, out_dir=str(tmp_path / "inf"),
    )  # fmt: skip
    assert set(results["scores"]) == {"exact_match", "exact_match_without_context"}
    assert results["num_tasks"] == 3 and results["benchmark"] == "repository-infilling-single-line"


def dict_to_first(files: list[Document], order: list[str]) -> Document:
    """The first file in dependency order, as held out (it has no context)."""
    doc = next(d for d in files if d.meta["path"] == order[0])
    return Document(doc.text, doc.doc_id, doc.source, {**doc.meta, "split": "validation"})


def test_a_repository_document_drawn_for_fim_starts_the_next_row_instead_of_being_cut(tokenizer):
    from codetune.data.packing import PackDocument, Packer

    assembler = RepositoryAssembler(backend_copy(tokenizer, text_only=True), None, {"repo": 10_000})
    (doc,) = assembler.run(_files(repos.PACKAGE))
    ids, _ = encode_pieces(assembler.tokenizer, layout_pieces(doc.text, doc.meta["layout"]))
    fim = FIMTransform(FIMConfig(fim_rate=1.0), tokenizer)
    packer = Packer(len(ids) + 20, tokenizer.eos_token_id, tokenizer.pad_token_id, ["repo"], fim)
    filler = PackDocument(
        "repo", "filler", 0, list(range(100, 130))
    )  # leaves less room than the document needs
    repo_doc = PackDocument("repo", doc.doc_id, 1, ids, text=doc.text, layout=doc.meta["layout"])
    rows = list(packer.pack([filler, repo_doc]))
    assert len(rows) == 2 and packer.repository_rows_closed == 1
    (span,) = rows[1]["documents"]
    assert span["doc_id"] == doc.doc_id and span["fim"] in ("psm", "spm") and span["start"] == 0
    end = span["end"]
    assert fim.unpermute_repository_ids(rows[1]["input_ids"][:end], tokenizer.eos_token_id) == doc.text
