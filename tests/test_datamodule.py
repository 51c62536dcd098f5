"""The data module end to end: cached tokenization, streaming, ranks, resume, objectives, bad input."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from codetune.data import corpus as corpus_module
from codetune.data.batch import BATCH_FIELDS, IGNORE_INDEX, TokenKind
from codetune.data.batches import POSITION_KEY, ResumableLoader
from codetune.data.chat import ChatFiles
from codetune.data.datamodule import CodeDataModule, Split
from codetune.data.fim import FIMConfig, FIMTransform
from codetune.data.mixing import MixConfig
from codetune.data.packing import Packer
from codetune.data.sources import CodeFiles, JsonlFiles

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data_modules" / "data"


def small_code(**kwargs) -> CodeFiles:
    return CodeFiles(
        path="@stdlib",
        name=kwargs.pop("name", "stdlib"),
        include=["json/*.py", "*.py"],
        max_files=kwargs.pop("max_files", 30),
        **kwargs,
    )


def make(tokenizer_spec, sources=None, **kwargs) -> CodeDataModule:
    kwargs.setdefault("seq_len", 128)
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("fim", FIMConfig(level="context"))
    return CodeDataModule(tokenizer=tokenizer_spec, sources=sources or [small_code()], **kwargs)


def row_ids(batches) -> list[list[int]]:
    return [row.tolist() for batch in batches for row in batch["input_ids"]]


def take(loader, n):
    """The next ``n`` batches of a fresh iteration, fetching no more than that."""
    out = []
    if n <= 0:
        return out
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


# --- batch contract and caching --------------------------------------------------------------------------


def test_batches_follow_the_contract(tokenizer_spec):
    dm = make(tokenizer_spec)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == set(BATCH_FIELDS)
    for key in BATCH_FIELDS:
        assert batch[key].shape == (4, 128) and batch[key].dtype == torch.long
    val = next(iter(dm.val_dataloader()))
    assert set(val) == set(BATCH_FIELDS)
    assert dm.source_names == ["stdlib"]


def test_second_setup_is_a_cache_hit(tokenizer_spec, monkeypatch):
    first = make(tokenizer_spec, seq_len=96)
    first.setup("fit")
    rows = row_ids(take(ResumableLoader(first.train_batches()), 5))

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached corpus must not be read, tokenized or packed again")

    import datasets

    monkeypatch.setattr(datasets.Dataset, "map", forbidden)
    monkeypatch.setattr(CodeFiles, "documents", forbidden)
    monkeypatch.setattr(Packer, "pack", forbidden)
    second = make(tokenizer_spec, seq_len=96)
    second.setup("fit")
    assert row_ids(take(ResumableLoader(second.train_batches()), 5)) == rows
    assert second.corpus.folder == first.corpus.folder


def test_changed_source_file_is_tokenized_again(tokenizer_spec, tmp_path):
    corpus = tmp_path / "code"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    first = make(
        tokenizer_spec, [CodeFiles(path=str(corpus), name="code")], batch_size=1, split=Split(val_fraction=0)
    )
    first.setup("fit")
    (corpus / "m0.py").write_text("def changed():\n    return 'new text'\n" * 20)
    second = make(
        tokenizer_spec, [CodeFiles(path=str(corpus), name="code")], batch_size=1, split=Split(val_fraction=0)
    )
    second.setup("fit")
    assert second.corpus.folder != first.corpus.folder
    texts = {d["doc_id"] for r in range(len(second.train_rows)) for d in second.train_rows.documents(r)}
    assert "m0.py" in texts


def test_tokenization_matches_the_fim_transforms_own_encoding(tokenizer_spec):
    dm = make(tokenizer_spec)
    dm.setup("fit")
    reference = FIMTransform(FIMConfig(), dm.tokenizer)
    for doc in list(dm.corpus.documents("stdlib", "train"))[:10]:
        ids, offsets = reference.encode_document(doc.text)
        assert doc.input_ids == ids
        assert doc.offsets == [tuple(o) for o in offsets]


def test_literal_sentinels_in_code_stay_text(tokenizer_spec, tmp_path):
    corpus = tmp_path / "code"
    corpus.mkdir()
    (corpus / "tricky.py").write_text('MARKERS = ["<PRE>", "<SUF>", "<MID>", "<EOT>"]\n' * 30)
    dm = make(
        tokenizer_spec,
        [CodeFiles(path=str(corpus), name="code")],
        fim=None,
        batch_size=1,
        split=Split(val_fraction=0),
    )
    dm.setup("fit")
    sentinels = {dm.tokenizer.convert_tokens_to_ids(t) for t in ("<PRE>", "<SUF>", "<MID>", "<EOT>")}
    ids = {int(i) for r in range(len(dm.train_rows)) for i in dm.train_rows.row(r)["input_ids"]}
    assert not ids & sentinels


# --- ranks, workers, resume ------------------------------------------------------------------------------


def documents_of(stream_batches):
    return [
        (span["doc_id"], span["chunk"])
        for batch, _ in stream_batches
        for row in batch
        for span in row["documents"]
    ]


def test_ranks_read_disjoint_rows_and_the_same_number_of_batches(tokenizer_spec):
    from codetune.data.batches import PackedBatches

    dm = make(tokenizer_spec)
    dm.setup("fit")
    ranks = [PackedBatches(dm.train_rows, 4, True, 0, rank, 3) for rank in range(3)]
    seen = [set(r.rank_rows(epoch=2).tolist()) for r in ranks]
    assert len({len(r) for r in ranks}) == 1
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert len(set.union(*seen)) == 3 * len(ranks[0]) * 4
    assert ranks[0].rank_rows(1).tolist() != ranks[0].rank_rows(2).tolist()  # reshuffled every epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_rows_of_an_uninterrupted_run(tokenizer_spec, workers):
    dm = make(tokenizer_spec, num_workers=workers)
    dm.setup("fit")
    per_epoch = len(dm.train_batches())
    total = per_epoch + 7  # crosses an epoch boundary
    straight = ResumableLoader(dm.train_batches(), num_workers=workers)
    expected = []
    while len(expected) < total:
        expected.extend(row_ids(take(straight, total - len(expected))))
    interrupted = ResumableLoader(dm.train_batches(), num_workers=workers)
    seen = row_ids(take(interrupted, 5))
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches"]) == (0, 5)
    resumed = ResumableLoader(dm.train_batches(), num_workers=workers)
    resumed.load_state_dict(state)
    while len(seen) < len(expected):
        seen.extend(row_ids(take(resumed, (len(expected) - len(seen)) // 4)))
    assert seen == expected


def test_resume_refuses_changed_data_settings(tokenizer_spec):
    dm = make(tokenizer_spec)
    dm.setup("fit")
    loader = ResumableLoader(dm.train_batches())
    take(loader, 2)
    state = loader.state_dict()
    other = make(tokenizer_spec, batch_size=2)
    other.setup("fit")
    with pytest.raises(ValueError, match="batch_size 4 -> 2"):
        ResumableLoader(other.train_batches()).load_state_dict(state)


def test_streaming_never_materialises_and_deals_documents_to_ranks_and_workers(tokenizer_spec, monkeypatch):
    import datasets

    def forbidden(*args, **kwargs):
        raise AssertionError("streaming must not build a datasets cache")

    monkeypatch.setattr(datasets.Dataset, "map", forbidden)
    monkeypatch.setattr(corpus_module.TokenizedCorpus, "build_or_load", forbidden)
    dm = make(tokenizer_spec, streaming=True, num_workers=2, fim=FIMConfig(level="document"))
    dm.setup("fit")
    assert dm.train_rows is None
    stream = dm.train_batches()
    shards = {}
    for rank in range(2):
        stream.rank, stream.world_size = rank, 2
        for worker in range(2):
            batches = stream.batches((0, 0), worker, 2)
            shards[(rank, worker)] = {d for d, _ in documents_of(take_batches(batches, 6))}
    keys = list(shards)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not shards[a] & shards[b], (a, b)


def take_batches(iterator, n):
    out = []
    for item in iterator:
        out.append(item)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_resume_continues_the_same_stream(tokenizer_spec, workers):
    dm = make(tokenizer_spec, streaming=True, num_workers=workers)
    dm.setup("fit")
    expected = row_ids(take(ResumableLoader(dm.train_batches(), num_workers=workers), 9))
    interrupted = ResumableLoader(dm.train_batches(), num_workers=workers)
    seen = row_ids(take(interrupted, 4))
    resumed = ResumableLoader(dm.train_batches(), num_workers=workers)
    resumed.load_state_dict(interrupted.state_dict())
    seen += row_ids(take(resumed, 5))
    assert seen == expected


@pytest.mark.slow
def test_resume_through_lightning_checkpoint_continues_with_the_same_batches(tokenizer_spec, tmp_path):
    import lightning as L

    from codetune.model.build import ModelSpec
    from codetune.modules.causal import CausalLM
    from tests.conftest import TINY_LLAMA

    class Record(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            assert POSITION_KEY not in batch
            self.rows.extend(r.tolist() for r in batch["input_ids"])

    def run(max_steps, ckpt=None, every=None):
        dm = make(tokenizer_spec, batch_size=2)
        module = CausalLM(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=dm.tokenizer)
        record = Record()
        callbacks = [record]
        if every:
            callbacks.append(
                L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1
                )
            )
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            enable_checkpointing=bool(every),
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return record.rows

    straight = run(9)
    first = run(5, every=5)
    ckpt = next(tmp_path.glob("*step=5*.ckpt"))
    assert (
        torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0][
            "batches"
        ]
        == 5
    )
    rest = run(9, ckpt=str(ckpt))
    assert first + rest == straight


# --- objectives and mixing ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instruct_mix(tokenizer_spec):
    sources = [
        ChatFiles(path=str(DEMO / "instruct-demo.jsonl"), name="instruct"),
        small_code(name="code"),
        JsonlFiles(path=str(DEMO / "nl-docstrings.jsonl"), name="nl"),
    ]
    dm = CodeDataModule(
        tokenizer=tokenizer_spec,
        sources=sources,
        seq_len=256,
        batch_size=4,
        fim=FIMConfig(level="context"),
        mix=MixConfig(weights={"instruct": 0.92, "code": 0.06, "nl": 0.02}, num_tokens=1_000_000),
    )
    dm.setup("fit")
    return dm


@pytest.mark.slow
def test_mix_shares_through_the_pipeline_within_a_point_over_a_million_tokens(instruct_mix):
    store = instruct_mix.train_rows
    counts = Counter()
    for i in range(len(store)):
        index = store.row(i)["source_index"]
        counts.update(index[index >= 0].tolist())
    total = sum(counts.values())
    assert total >= 1_000_000
    shares = {name: counts[i] / total for i, name in enumerate(instruct_mix.source_names)}
    print(f"\nrealised shares over {total:,} tokens: {shares}")
    for name, weight in {"instruct": 0.92, "code": 0.06, "nl": 0.02}.items():
        assert abs(shares[name] - weight) <= 0.01


@pytest.mark.slow
def test_each_source_keeps_its_own_objective(instruct_mix):
    store = instruct_mix.train_rows
    fim_spans, chat_spans = Counter(), 0
    for i in range(min(len(store), 400)):
        row = store.row(i, documents=True)
        for span in row["documents"]:
            a, b = span["start"], span["end"]
            labels, ids = row["labels"][a:b], row["input_ids"][a:b]
            fim_spans[(span["source"], span["fim"])] += 1
            if span["source"] == "instruct":
                chat_spans += 1
                assert span["fim"] is None
            if span["source"] == "nl":  # causal: every token but the span's first is trained on
                assert span["fim"] is None and (labels[1:] == ids[1:]).all()
    assert fim_spans[("code", "psm")] + fim_spans[("code", "spm")] > 0
    assert fim_spans[("instruct", None)] == chat_spans > 0


def test_chat_rows_train_only_on_assistant_tokens(tokenizer_spec):
    from codetune.data.chat import ChatEncoder, conversation_messages

    dm = CodeDataModule(
        tokenizer=tokenizer_spec,
        sources=[ChatFiles(path=str(DEMO / "instruct-demo.jsonl"), name="instruct")],
        seq_len=128,
        batch_size=2,
        split=Split(val_fraction=0),
    )
    dm.setup("fit")
    encoder = ChatEncoder(dm.tokenizer, "codetune")
    by_id = {d.doc_id: conversation_messages(d.text) for d in dm.sources[0].documents()}
    # Reassemble each conversation from its chunks and compare with the encoder run on its own.
    pieces: dict[str, list] = {}
    for i in range(len(dm.train_rows)):
        row = dm.train_rows.row(i, documents=True)
        for span in row["documents"]:
            a, b = span["start"], span["end"]
            pieces.setdefault(span["doc_id"], []).append(
                (span["chunk"], row["input_ids"][a:b], row["labels"][a:b])
            )
    assert len(pieces) == len(by_id)
    for doc_id, chunks in pieces.items():
        chunks.sort(key=lambda c: c[0])
        ids = np.concatenate([c[1] for c in chunks]).tolist()
        labels = np.concatenate([c[2] for c in chunks]).tolist()
        want_ids, want_labels = encoder.encode(by_id[doc_id])
        assert ids == want_ids
        starts = np.cumsum([0] + [len(c[1]) for c in chunks[:-1]]).tolist()
        want_labels = [IGNORE_INDEX if k in starts else lab for k, lab in enumerate(want_labels)]
        assert labels == want_labels
        trained = dm.tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
        for m in by_id[doc_id]:
            if m["role"] != "assistant":
                assert m["content"] not in trained


# --- measured: packing efficiency ----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_token_fraction_on_the_stdlib_at_2048(tokenizer_spec):
    dm = CodeDataModule(
        tokenizer=tokenizer_spec,
        sources=[
            CodeFiles(
                path="@stdlib", name="stdlib", exclude=["test/**", "idlelib/**", "lib2to3/**", "**/tests/**"]
            )
        ],
        seq_len=2048,
        batch_size=8,
        fim=FIMConfig(level="document"),
        num_proc=2,
    )
    dm.setup("fit")
    summary = dm.train_summary
    print(
        f"\nstdlib at seq_len 2048: real-token fraction {summary.real_fraction:.5f} over {summary.rows} rows"
    )
    assert summary.real_fraction >= 0.99


# --- bad input -----------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_path_and_line_or_is_counted(tokenizer_spec, tmp_path):
    path = tmp_path / "corpus.jsonl"
    good = [json.dumps({"text": f"def f{i}():\n    return {i}\n" * 5}) for i in range(8)]
    path.write_text("\n".join(good[:3] + ['{"text": "unterminated'] + good[3:]) + "\n")
    dm = make(
        tokenizer_spec, [JsonlFiles(path=str(path), name="code")], split=Split(val_fraction=0), batch_size=1
    )
    with pytest.raises(ValueError, match=rf"{path}:4: malformed JSON"):
        dm.setup("fit")
    dm = make(
        tokenizer_spec,
        [JsonlFiles(path=str(path), name="code", on_error="skip")],
        split=Split(val_fraction=0),
        batch_size=1,
    )
    dm.setup("fit")
    assert dm.corpus.report.skipped["code"] == {"malformed_json": 1}
    assert "malformed_json=1" in "\n".join(dm.summary_lines())


def test_unreadable_file_is_named(tokenizer_spec, tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n')[:-12])  # truncated archive
    dm = make(tokenizer_spec, [JsonlFiles(path=str(path), name="code")], batch_size=1)
    with pytest.raises(ValueError, match="broken.jsonl.gz: cannot be read"):
        dm.setup("fit")


def test_missing_paths_fail_before_the_tokenizer_is_built(tokenizer_spec, tmp_path, monkeypatch):
    import codetune.data.datamodule as datamodule

    monkeypatch.setattr(datamodule, "build_tokenizer", lambda spec: pytest.fail("built a tokenizer first"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make(tokenizer_spec, [JsonlFiles(path=str(tmp_path / "nope.jsonl"))])
    with pytest.raises(ValueError, match=r"mix.weights sum to 0\.9"):
        make(
            tokenizer_spec,
            [small_code(name="a"), small_code(name="b")],
            mix=MixConfig(weights={"a": 0.6, "b": 0.3}),
        )
    with pytest.raises(ValueError, match="names must be distinct"):
        make(tokenizer_spec, [small_code(), small_code()])
    with pytest.raises(ValueError, match="streaming with several sources needs data.mix.weights"):
        make(tokenizer_spec, [small_code(name="a"), small_code(name="b")], streaming=True)
    with pytest.raises(ValueError, match="'chat' needs conversations"):
        make(tokenizer_spec, [small_code()], objectives={"stdlib": "chat"})


def test_source_emptied_by_filters_or_curation_is_named(tokenizer_spec, tmp_path):
    corpus = tmp_path / "code"
    corpus.mkdir()
    (corpus / "big.py").write_text("x = 1\n" * 100)
    dm = make(tokenizer_spec, [CodeFiles(path=str(corpus), name="code", max_bytes=10)])
    with pytest.raises(ValueError, match="no usable files.*too_large=1"):
        dm.setup("fit")
    # A second source holding only copies of the first is emptied by cross-source dedup.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "same.py").write_text("x = 1\n" * 100)
    dm = make(
        tokenizer_spec,
        [CodeFiles(path=str(corpus), name="code"), CodeFiles(path=str(copy), name="copy")],
        mix=MixConfig(weights={"code": 0.5, "copy": 0.5}),
    )
    with pytest.raises(ValueError, match=r"sources\[copy\]: nothing left after curation.*exact_duplicate"):
        dm.setup("fit")


def test_tokenizer_without_fim_sentinels_gets_them_or_says_how(tmp_path):

    from codetune.data.tokenizer import TokenizerSpec
    from tests.corpora import byte_level_bpe

    # A "pretrained" tokenizer folder whose vocabulary has no FIM sentinels.
    tok = byte_level_bpe(
        ["textwrap.py", "heapq.py"], ["<|endoftext|>"], vocab_size=600, eos_token="<|endoftext|>"
    )
    tok.save_pretrained(tmp_path / "tok")
    dm = make(TokenizerSpec(name_or_path=str(tmp_path / "tok")))
    vocab = dm.tokenizer.get_vocab()
    assert all(t in vocab and vocab[t] >= 600 for t in ("<PRE>", "<SUF>", "<MID>", "<EOT>"))  # added
    dm.setup("fit")
    kinds = {int(k) for i in range(20) for k in dm.train_rows.row(i)["token_kind"]}
    assert TokenKind.FIM_MIDDLE in kinds  # FIM works with the added sentinels
    with pytest.raises(ValueError, match="lacks FIM sentinels.*add_missing_sentinels: true"):
        make(TokenizerSpec(name_or_path=str(tmp_path / "tok"), add_missing_sentinels=False))


def test_each_trainer_call_prepares_data_but_it_is_built_and_reported_once(tokenizer_spec, caplog):
    import logging

    dm = make(tokenizer_spec)
    with caplog.at_level(logging.INFO, logger="codetune.data.datamodule"):
        for _ in range(2):  # validate (the summary's "before"), then fit
            dm.prepare_data()
            dm.setup("fit")
    assert sum(r.getMessage().startswith("data:") for r in caplog.records) == 1
