"""``codetune infill``: the middle a model writes between the code of two files."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from codetune.checkpoints import load_trained
from codetune.checkpoints.trained import peek_trained
from codetune.eval.infilling import check_format, infill_one, require_sentinels


def infill(
    model: str,
    prefix: str,
    suffix: str,
    format: Literal["psm", "spm"] = "psm",
    sentinels: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    base_model: str | None = None,
) -> str:
    """Fill in the code between the contents of the ``prefix`` and ``suffix`` files; returns the middle.

    Uses the same prompt layout and stopping as the infilling eval, for a quick look at a model.

    Args:
        model: Exported Hugging Face folder, training checkpoint (``.ckpt``) or run directory.
        prefix: File with the code before the gap.
        suffix: File with the code after the gap.
        format: FIM layout of the prompt, ``psm`` or ``spm`` (as in training).
        sentinels: FIM sentinel set (``codellama``, ``codellama-hf``, ``starcoder``); default: the one the tokenizer carries.
        max_new_tokens: Generation budget for the middle.
        temperature: Sampling temperature; 0 is greedy.
        seed: Seed of the sampling.
        base_model: Local folder or Hub id of the base model, when the one the checkpoint names has moved (as for
            ``codetune export``).
    """
    check_format(format)
    texts = []
    for name, path in (("prefix", prefix), ("suffix", suffix)):
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"--{name} {path}: no such file")
        texts.append(file.read_text())
    # The FIM tokens are checked from the tokenizer, before the weights load (minutes for a 7B).
    require_sentinels(peek_trained(model, base_model)[0], sentinels)
    model_obj, tokenizer = load_trained(model, base_model=base_model)
    return infill_one(model_obj, tokenizer, *texts, format, sentinels, max_new_tokens, temperature, seed)
