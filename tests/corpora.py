"""Test data made in the test: standard-library modules as real code, and small BPE tokenizers trained on them."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(count: int, stride: int) -> dict[str, str]:
    """Every ``stride``-th stdlib module (sorted, deterministic), read as UTF-8: real code with some non-ASCII."""
    paths = sorted(p for p in STDLIB.rglob("*.py") if "site-packages" not in p.parts)
    texts: dict[str, str] = {}
    for path in paths[::stride]:
        try:
            texts[str(path.relative_to(STDLIB))] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(texts) == count:
            break
    return texts


def byte_level_bpe(
    files: list[str], special_tokens: list[str], vocab_size: int = 1000, **tokens: str | list[str]
) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (no dummy prefix) trained on stdlib ``files``; ``tokens`` names its eos/pad/..."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(special_tokens)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([(STDLIB / f).read_text() for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
