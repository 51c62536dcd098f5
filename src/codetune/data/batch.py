"""The batch contract between the data side and the training module: fields, dtypes, labels and token kinds.

A packed row (and a batch of rows) holds, per position ``t``:

* ``input_ids`` — the token;
* ``labels`` — the target of the loss at ``t`` (unshifted: the module shifts), :data:`IGNORE_INDEX` for none;
* ``position_ids`` — restart at 0 at every packed document, so transformers builds a block-diagonal mask;
* ``token_kind`` — what the *target* token ``t`` is (:class:`TokenKind`); 0 marks padding;
* ``source_index`` — which data source the token came from (index into the data module's ``source_names``),
  -1 for padding.

Only :data:`MODEL_INPUTS` reach the model; the other fields feed metrics. Writers (packing, chat masking, the
row store) and readers (the stages, callbacks, previews) import these names from here.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np

IGNORE_INDEX = -100
"""Label of a position that carries no loss (PyTorch's cross-entropy default)."""


class TokenKind(IntEnum):
    """What a row position holds; ``token_kind[t]`` describes the target token ``t`` (labels are unshifted)."""

    PAD = 0
    PLAIN = 1
    FIM_CONTEXT = 2
    """A FIM document's sentinels, prefix, suffix and trailing end-of-text."""
    FIM_MIDDLE = 3
    """The infilling target: the middle and its end sentinel."""


BATCH_FIELDS: dict[str, Any] = {
    "input_ids": np.int32,
    "labels": np.int32,
    "position_ids": np.int32,
    "token_kind": np.int8,
    "source_index": np.int16,
}
"""The tensor fields of a row, in order, with the dtype the row store keeps them in."""

MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")
"""Batch fields the model itself consumes."""


def real_tokens(batch: dict[str, Any]) -> Any:
    """Mask of the positions that hold a real (non-pad) token, for a row (lists or arrays) or a batch (tensors).

    ``token_kind`` marks padding; a batch from another pipeline may carry an ``attention_mask`` instead; with
    neither, every position counts.
    """
    for key, pad in (("token_kind", TokenKind.PAD), ("attention_mask", 0)):
        if key in batch:
            values = batch[key]
            return (np.asarray(values) if isinstance(values, list | tuple) else values) != pad
    ids = batch["input_ids"]
    ids = np.asarray(ids) if isinstance(ids, list | tuple) else ids
    return ids == ids  # all true, in the batch's own array type
