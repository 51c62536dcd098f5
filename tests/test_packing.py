"""Packer: rows hold several documents, nothing leaks or is lost, FIM survives packing, resume is exact."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from transformers import PreTrainedTokenizerFast

from codetune.data.batch import IGNORE_INDEX, TokenKind
from codetune.data.fim import FIMConfig, FIMTransform
from codetune.data.packing import PackDocument, Packer
from codetune.data.tokenizer import SENTINEL_SETS
from tests.corpora import STDLIB, byte_level_bpe, stdlib_texts


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained in the test, FIM sentinels as special tokens."""
    specials = [
        "<|endoftext|>",
        "<pad>",
        *SENTINEL_SETS["codellama"].tokens(),
        *SENTINEL_SETS["starcoder"].tokens(),
    ]
    files = ["textwrap.py", "string.py", "heapq.py"]
    return byte_level_bpe(files, specials, eos_token="<|endoftext|>", pad_token="<pad>")


@pytest.fixture(scope="module")
def corpus() -> dict[str, str]:
    texts = stdlib_texts(80, stride=5)
    assert any(not t.isascii() for t in texts.values())  # multi-byte characters exercise the cut rules
    return texts


def make_packer(
    tokenizer, seq_len: int, fim: FIMConfig | None = None, sources=("code",), sentinels=None
) -> Packer:
    transform = None if fim is None else FIMTransform(fim, tokenizer, sentinels)
    return Packer(seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id, list(sources), fim=transform)


def text_documents(texts: dict[str, str], tokenizer, source: str = "code") -> list[PackDocument]:
    """Code documents as the data module hands them over: ids and character offsets with their text."""
    encode = FIMTransform(FIMConfig(), tokenizer).encode_document
    return [
        PackDocument(source, name, i, *encode(t)[:1], text=t, offsets=encode(t)[1])
        for i, (name, t) in enumerate(texts.items())
    ]


def spans_by_document(rows):
    """doc_id -> list of (row, span) in stream order."""
    spans = defaultdict(list)
    for row in rows:
        for span in row["documents"]:
            spans[span["doc_id"]].append((row, span))
    return spans


def check_row_invariants(row, seq_len: int, pad_id: int) -> None:
    for key in ("input_ids", "labels", "position_ids", "token_kind", "source_index"):
        assert len(row[key]) == seq_len, key
    covered = 0
    for span in row["documents"]:
        start, end = span["start"], span["end"]
        assert start == covered  # spans tile the row from the left, padding only after them
        assert row["position_ids"][start:end] == list(range(end - start))
        assert row["labels"][start] == IGNORE_INDEX
        assert all(k != TokenKind.PAD for k in row["token_kind"][start:end])
        covered = end
    pad = seq_len - covered
    assert row["input_ids"][covered:] == [pad_id] * pad
    assert row["labels"][covered:] == [IGNORE_INDEX] * pad
    assert row["position_ids"][covered:] == list(range(pad))
    assert row["token_kind"][covered:] == [TokenKind.PAD] * pad
    assert row["source_index"][covered:] == [-1] * pad


# -- layout ------------------------------------------------------------------------------------------------


def test_rows_hold_several_documents_with_restarting_positions(tokenizer) -> None:
    texts = {f"doc{i}": f"def f{i}(x):\n    return x + {i}\n" for i in range(40)}
    docs = [
        PackDocument(source="code", doc_id=n, ordinal=i, input_ids=tokenizer(t)["input_ids"])
        for i, (n, t) in enumerate(texts.items())
    ]
    packer = make_packer(tokenizer, 64)
    rows = list(packer.pack(docs))
    assert max(len(r["documents"]) for r in rows) >= 3
    for row in rows:
        check_row_invariants(row, 64, tokenizer.pad_token_id)
        for span in row["documents"]:
            start, end = span["start"], span["end"]
            # Every token but the span's first is its own label; the first cannot be predicted across spans.
            assert row["labels"][start + 1 : end] == row["input_ids"][start + 1 : end]
            assert row["source_index"][start:end] == [0] * (end - start)
    # Only the last row has padding.
    assert all(r["token_kind"][-1] != TokenKind.PAD for r in rows[:-1])


def test_no_token_is_dropped_and_long_documents_are_chunked(tokenizer, corpus) -> None:
    texts = dict(list(corpus.items())[:30])
    docs = [
        PackDocument(source="code", doc_id=n, ordinal=i, input_ids=tokenizer(t)["input_ids"])
        for i, (n, t) in enumerate(texts.items())
    ]
    rows = list(make_packer(tokenizer, 256).pack(docs))
    spans = spans_by_document(rows)
    assert list(spans) == list(texts)  # stream order kept
    for doc in docs:
        pieces = spans[doc.doc_id]
        assert [s["chunk"] for _, s in pieces] == list(range(len(pieces)))
        ids = [t for row, s in pieces for t in row["input_ids"][s["start"] : s["end"]]]
        assert ids == doc.input_ids + [tokenizer.eos_token_id]  # every document ends with end-of-text
    assert any(len(p) > 2 for p in spans.values())  # some documents really were split


def test_loss_masking_is_preserved(tokenizer) -> None:
    prompt = tokenizer("user: add two numbers\nassistant: ")["input_ids"]
    answer = tokenizer("def add(a, b):\n    return a + b\n")["input_ids"]
    docs = [
        PackDocument(
            source="chat",
            doc_id=i,
            ordinal=i,
            input_ids=prompt + answer,
            labels=[IGNORE_INDEX] * len(prompt) + answer,
            text="ignored: documents with labels are never FIM-transformed",
        )
        for i in range(12)
    ]
    packer = make_packer(tokenizer, 96, FIMConfig(fim_rate=1.0), sources=("code", "chat"))
    rows = list(packer.pack(docs))
    spans = spans_by_document(rows)
    eos = tokenizer.eos_token_id
    for doc in docs:
        expected = doc.labels + [eos]  # the answer is trained, so its end-of-text is too
        offset = 0
        for row, s in spans[doc.doc_id]:
            n = s["end"] - s["start"]
            # Each span (a chunk continuing in a new row too) starts unlabelled; the rest keeps the mask.
            assert row["labels"][s["start"] : s["end"]] == [IGNORE_INDEX] + expected[offset + 1 : offset + n]
            offset += n
        assert offset == len(expected)
        assert all(s["fim"] is None for _, s in spans[doc.doc_id])
        assert all(row["source_index"][s["start"]] == 1 for row, s in spans[doc.doc_id])


# -- FIM through packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sentinels", ["codellama", "starcoder"])
def test_document_level_fim_round_trips_and_never_cuts_a_fim_document(tokenizer, corpus, sentinels) -> None:
    config = FIMConfig(fim_rate=0.9, seed=1)
    fim = FIMTransform(config, tokenizer, sentinels)
    texts = dict(list(corpus.items())[:40])
    rows = list(
        make_packer(tokenizer, 1024, config, sentinels=sentinels).pack(text_documents(texts, tokenizer))
    )
    spans = spans_by_document(rows)
    n_fim = 0
    for name, text in texts.items():
        pieces = spans[name]
        if any(s["fim"] for _, s in pieces):
            assert len(pieces) == 1  # FIM documents are never cut across rows (Code Llama)
            row, s = pieces[0]
            ids = row["input_ids"][s["start"] : s["end"]]
            assert ids[-1] == tokenizer.eos_token_id
            assert fim.unpermute_ids(ids, eos_id=tokenizer.eos_token_id) == text
            check_kinds(row, s, fim, tokenizer)
            n_fim += 1
        else:
            ids = [t for row, s in pieces for t in row["input_ids"][s["start"] : s["end"]]]
            assert tokenizer.decode(ids[:-1]) == text
    assert n_fim > 0


def check_kinds(row, span, fim: FIMTransform, tokenizer) -> None:
    """Kind 3 marks exactly the tokens after <MID> that the model generates: the middle and <EOT>."""
    ids = row["input_ids"][span["start"] : span["end"]]
    kinds = row["token_kind"][span["start"] : span["end"]]
    mid, end = ids.index(fim.middle_id), ids.index(fim.end_id)
    middle_tokens = [k for k in kinds if k == TokenKind.FIM_MIDDLE]
    assert kinds[: mid + 1] == [TokenKind.FIM_CONTEXT] * (mid + 1)
    assert kinds[end] == TokenKind.FIM_MIDDLE and kinds[end + 1 :] == [TokenKind.FIM_CONTEXT] * (
        len(ids) - end - 1
    )
    if span["fim"] == "psm":
        assert len(middle_tokens) == end - mid
    else:  # SPM: the prefix after <MID> is context; the middle is decoded from the kind-3 tokens
        middle_ids = [i for i, k in zip(ids, kinds, strict=True) if k == TokenKind.FIM_MIDDLE][:-1]
        prefix_ids = ids[mid + 1 : end - len(middle_ids)]
        assert all(k == TokenKind.FIM_CONTEXT for k in kinds[mid + 1 : end - len(middle_ids)])
        assert tokenizer.decode(prefix_ids + middle_ids) == tokenizer.decode(ids[mid + 1 : end])


def test_context_level_fim_fragments_round_trip_exactly(tokenizer, corpus) -> None:
    config = FIMConfig(fim_rate=0.9, level="context", seed=2)
    fim = FIMTransform(config, tokenizer)
    texts = dict(list(corpus.items())[:40])
    packer = make_packer(tokenizer, 512, config)
    rows = list(packer.pack(text_documents(texts, tokenizer)))
    spans = spans_by_document(rows)
    eos = tokenizer.eos_token_id
    for row in rows:
        check_row_invariants(row, 512, tokenizer.pad_token_id)
    n_fragments = n_fim = 0
    for name, text in texts.items():
        rebuilt = []
        for row, s in spans[name]:
            ids = row["input_ids"][s["start"] : s["end"]]
            n_fragments += 1
            if s["fim"]:
                n_fim += 1
                rebuilt.append(fim.unpermute_ids(ids, eos_id=eos))
                check_kinds(row, s, fim, tokenizer)
            else:
                rebuilt.append(tokenizer.decode([t for t in ids if t != eos]))
        assert "".join(rebuilt) == text, name  # fragments tile the text: nothing pushed out, nothing split
        last_row, last = spans[name][-1]
        assert last_row["input_ids"][last["end"] - 1] == eos
    # Every fragment is drawn independently; a few are too small for the sentinels and stay causal.
    assert abs(n_fim / n_fragments - 0.9) < 0.05 + 4 * math.sqrt(0.09 / n_fragments)
    assert packer.stats.real_fraction > 0.99


def test_context_level_cuts_fall_between_characters(tokenizer) -> None:
    # Real files dense in multi-byte characters, plus a synthetic one where nearly every character is split
    # over several byte-level tokens; short rows force many cuts.
    texts = {name: (STDLIB / name).read_text(encoding="utf-8") for name in ["re/_casefix.py", "shlex.py"]}
    texts["dense"] = "".join(f"s{i} = '{chr(0x4E00 + 37 * i)}{chr(0x1F600 + i % 80)}é'\n" for i in range(400))
    config = FIMConfig(fim_rate=0.5, level="context", seed=6)
    fim = FIMTransform(config, tokenizer)
    rows = list(make_packer(tokenizer, 48, config).pack(text_documents(texts, tokenizer)))
    eos = tokenizer.eos_token_id
    for name, pieces in spans_by_document(rows).items():
        rebuilt = []
        for row, s in pieces:
            ids = row["input_ids"][s["start"] : s["end"]]
            rebuilt.append(fim.unpermute_ids(ids, eos_id=eos) if s["fim"] else tokenizer.decode(ids))
        assert "".join(rebuilt).removesuffix(tokenizer.eos_token) == texts[name], name


def test_observed_fim_and_spm_rates_in_rows(tokenizer) -> None:
    texts = {f"f{i}": f'def f{i}(a, b):\n    """Add {i}."""\n    return a * {i} + b\n' for i in range(1500)}
    config = FIMConfig(fim_rate=0.9, spm_rate=0.5, seed=7)
    packer = make_packer(tokenizer, 2048, config)
    rows = list(packer.pack(text_documents(texts, tokenizer)))
    first_spans = {doc_id: pieces[0][1] for doc_id, pieces in spans_by_document(rows).items()}
    modes = [span["fim"] for span in first_spans.values()]
    n, n_fim, n_spm = len(modes), sum(m is not None for m in modes), modes.count("spm")
    assert n == len(texts)
    # Only the last document of a row can be cut (or grow past the row when transformed) and stay causal.
    assert packer.fim_left_causal <= len(rows)
    assert abs((n_fim + packer.fim_left_causal) / n - 0.9) <= 4 * math.sqrt(0.09 / n)
    assert abs(n_fim / n - 0.9) <= 4 * math.sqrt(0.09 / n) + len(rows) / n
    assert abs(n_spm / n_fim - 0.5) <= 4 * math.sqrt(0.25 / n_fim)
    assert packer.stats.fim_psm + packer.stats.fim_spm == n_fim


# -- efficiency --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("level", ["document", "context"])
def test_real_token_fraction_on_stdlib_at_2048(tokenizer, level, capsys) -> None:
    texts = stdlib_texts(400, stride=4)
    packer = make_packer(tokenizer, 2048, FIMConfig(level=level))
    rows = list(packer.pack(text_documents(texts, tokenizer)))
    real = sum(k != TokenKind.PAD for r in rows for k in r["token_kind"])
    fraction = real / (len(rows) * 2048)
    assert fraction == packer.stats.real_fraction
    with capsys.disabled():
        print(
            f"\n[{level}-level FIM] {len(texts)} stdlib files, {len(rows)} rows of 2048: real-token fraction "
            f"{fraction:.5f}; FIM psm={packer.stats.fim_psm} spm={packer.stats.fim_spm} "
            f"left causal={packer.fim_left_causal} of {packer.stats.span_count} spans"
        )
    assert fraction >= 0.99


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_documents_are_refused_with_the_document_named(tokenizer) -> None:
    packer = make_packer(tokenizer, 64)
    with pytest.raises(ValueError, match=r"'d1'.*'web'.*\['code'\]"):
        list(packer.pack([PackDocument(source="web", doc_id="d1", ordinal=0, input_ids=[5, 6])]))
    with pytest.raises(ValueError, match=r"'d2'.*3 labels for 2 input_ids"):
        list(
            make_packer(tokenizer, 64).pack(
                [PackDocument("code", "d2", 0, input_ids=[5, 6], labels=[1, 2, 3])]
            )
        )
    with pytest.raises(ValueError, match="seq_len"):
        make_packer(tokenizer, 4)
