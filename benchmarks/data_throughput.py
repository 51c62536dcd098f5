"""Data path throughput: tokens/s of tokenize + FIM + pack on the Python standard library.

Runs the data module's own stages with an empty cache (so nothing is skipped): read + curate, tokenize
(``datasets.map``), then FIM + pack + mix into the row store. Prints one Markdown table row per setting.

    python benchmarks/data_throughput.py                       # seq_len 2048 document-level, 256 context-level
    python benchmarks/data_throughput.py --num_proc 2 --seq_len 2048 --level document
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(seq_len: int, level: str, num_proc: int | None, max_files: int | None) -> dict[str, float]:
    from codetune.data.corpus import TokenizedCorpus, corpus_key, curated_documents
    from codetune.data.datamodule import CodeDataModule
    from codetune.data.fim import FIMConfig
    from codetune.data.sources import CodeFiles
    from codetune.data.tokenizer import TokenizerSpec, TrainTokenizer

    source = CodeFiles(
        path="@stdlib",
        name="stdlib",
        exclude=["test/**", "idlelib/**", "lib2to3/**", "**/tests/**"],
        max_files=max_files,
    )
    spec = TokenizerSpec(train=TrainTokenizer(vocab_size=4096, max_files=300))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CODETUNE_CACHE"] = cache
        dm = CodeDataModule(
            spec, [source], seq_len=seq_len, batch_size=8, fim=FIMConfig(level=level), num_proc=num_proc
        )
        start = time.perf_counter()
        documents, _ = curated_documents(dm.sources, dm.curation)
        n_docs = sum(1 for _ in documents)
        read = time.perf_counter() - start
        key = corpus_key(
            dm.tokenizer, dm.sources, dm.curation, dm.objectives, dm.encoder.offsets, dm.chat_template
        )
        start = time.perf_counter()
        dm.corpus = TokenizedCorpus.build_or_load(
            dm.sources, dm.curation, dm.encoder, key, dm._cache, num_proc
        )
        read_tokenize = time.perf_counter() - start
        tokenize = max(read_tokenize - read, 1e-9)  # the build reads and curates again before tokenizing
        start = time.perf_counter()
        dm._build_packed()  # corpus cached: this is FIM + pack + mix + writing the rows
        pack = time.perf_counter() - start
        summary = dm.train_summary
        tokens = dm.corpus.tokens("stdlib", "train") + dm.corpus.tokens("stdlib", "validation")
    return {
        "documents": n_docs,
        "tokens": tokens,
        "read_s": read,
        "tokenize_s": tokenize,
        "pack_s": pack,
        "tokenize_tok_s": tokens / tokenize,
        "pack_tok_s": tokens / pack,
        "data_path_tok_s": tokens / (tokenize + pack),
        "real_fraction": summary.real_fraction,
        "fim_rate": summary.fim_rates(["stdlib"])[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_len", type=int, nargs="*", default=None)
    parser.add_argument("--level", choices=["document", "context"], default=None)
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--max_files", type=int, default=None)
    args = parser.parse_args()
    settings = [(2048, "document"), (256, "context")]
    if args.seq_len:
        settings = [(s, args.level or "document") for s in args.seq_len]
    print(
        "| seq_len | FIM level | num_proc | documents | tokens | tokenize tok/s | FIM+pack tok/s | tokenize+FIM+pack tok/s | real-token fraction | FIM rate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq_len, level in settings:
        r = run(seq_len, level, args.num_proc, args.max_files)
        print(
            f"| {seq_len} | {level} | {args.num_proc or 1} | {r['documents']} | {r['tokens']:,} | "
            f"{r['tokenize_tok_s']:,.0f} | {r['pack_tok_s']:,.0f} | {r['data_path_tok_s']:,.0f} | "
            f"{r['real_fraction']:.4f} | {r['fim_rate']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
