"""The GGUF metadata codetune writes and checks: the key names (llama.cpp's contract) and a fast reader.

GGUF v2/v3 (llama.cpp ``docs/gguf.md``): ``GGUF`` magic, version, tensor and key/value counts, the key/value
pairs, then the tensor infos. The ``gguf`` package's ``GGUFReader`` maps every array element to a numpy view,
which takes seconds to tens of seconds for a 50k-150k-token vocabulary and its merges; this reader decodes the
same section with ``struct`` in a fraction of that and skips the tensor data. The tests compare the two.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

# Keys (llama.cpp gguf-py ``Keys.Tokenizer``): what the exporter writes and what llama.cpp's loader reads.
FIM_KEYS = {
    "prefix": "tokenizer.ggml.fim_pre_token_id",
    "suffix": "tokenizer.ggml.fim_suf_token_id",
    "middle": "tokenizer.ggml.fim_mid_token_id",
    "pad": "tokenizer.ggml.fim_pad_token_id",
}
FIM_REP_KEY = "tokenizer.ggml.fim_rep_token_id"
FIM_SEP_KEY = "tokenizer.ggml.fim_sep_token_id"
EOT_KEY = "tokenizer.ggml.eot_token_id"
EOS_KEY = "tokenizer.ggml.eos_token_id"
BOS_KEY = "tokenizer.ggml.bos_token_id"
ADD_BOS_KEY = "tokenizer.ggml.add_bos_token"
ADD_EOS_KEY = "tokenizer.ggml.add_eos_token"
TOKENS_KEY = "tokenizer.ggml.tokens"
TOKEN_TYPE_KEY = "tokenizer.ggml.token_type"
ARCHITECTURE_KEY = "general.architecture"
TENSORS = "tensors"
"""Not a GGUF key: where :func:`read_gguf_metadata` lists the tensor names."""
CONTROL, USER_DEFINED = 3, 4
"""gguf ``TokenType`` values of tokens llama.cpp matches as one piece in a prompt instead of splitting them."""

# GGUFValueType -> struct format (little-endian); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value of a GGUF file (arrays as lists, strings decoded) and its tensor names under ``"tensors"``."""
    # Memory-mapped: only the metadata pages at the start of a multi-gigabyte file are read.
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        reader = _Reader(mapped)
        if bytes(reader.take(4)) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = reader.scalar("I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version}; this reader reads little-endian v2/v3 files")
        n_tensors, n_kv = reader.scalar("Q"), reader.scalar("Q")
        facts: dict[str, Any] = {}
        for _ in range(n_kv):
            key = reader.string()
            facts[key] = reader.value(reader.scalar("I"))
        names = []
        for _ in range(n_tensors):
            names.append(reader.string())
            reader.take(8 * reader.scalar("I") + 4 + 8)  # dims, type, offset
        facts[TENSORS] = names
    return facts


class _Reader:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ValueError("truncated GGUF metadata")
        piece = self.data[self.at : self.at + n]
        self.at += n
        return piece

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        (value,) = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += size
        return value

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            element, count = self.scalar("I"), self.scalar("Q")
            if element in _SCALARS:
                fmt = _SCALARS[element]
                values = struct.unpack_from(f"<{count}{fmt}", self.data, self.at)
                self.at += count * struct.calcsize(fmt)
                return list(values)
            return [self.value(element) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.scalar(_SCALARS[kind])
