"""llama.cpp's own files, from a pinned PyPI source distribution: vocabulary fixtures and the GGUF converter.

The ``llama-cpp-python`` sdist vendors llama.cpp's source tree. Two parts of it serve codetune, and neither needs
a compiler: ``models/ggml-vocab-*.gguf`` (vocabulary-only GGUF files of real model families, with llama.cpp's
reference tokenizations ``.inp``/``.out`` beside them) and ``convert_hf_to_gguf.py`` with its ``conversion/``
package and ``gguf-py`` (the converter ``codetune export --format gguf`` runs). The archive is fetched once from
the package index (``PIP_INDEX_URL`` or PyPI), checked against the pinned SHA-256, and the parts are unpacked
into ``<cache>/llama.cpp/<version>/``. Offline, a copy of the archive given by ``CODETUNE_LLAMA_CPP_SDIST`` (or
already in the cache) is used; without either the error says how to provide one.

Fetch it ahead of time (CI, an air-gapped machine) with ``python -m codetune.llama_cpp``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

from codetune.storage import atomic_folder, cache_root

log = logging.getLogger(__name__)

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_ENV = "CODETUNE_LLAMA_CPP_SDIST"
_VENDOR = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
# What is unpacked (paths inside llama.cpp's tree): the vocabularies, the converter and its two packages.
_KEEP = ("models/ggml-vocab-", "convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")


class LlamaCppUnavailable(FileNotFoundError):
    """llama.cpp's files cannot be had on this machine (offline and no local copy)."""


def llama_cpp_dir(cache_dir: str | None = None) -> Path:
    """The unpacked llama.cpp files (``models/``, ``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``),
    fetched and verified on first use."""
    folder = cache_root(cache_dir) / "llama.cpp" / VERSION
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    archive = _archive(cache_root(cache_dir) / "downloads")
    with atomic_folder(folder) as tmp:
        _unpack(archive, tmp)
    log.info("unpacked llama.cpp %s (%s) into %s", VERSION, PACKAGE, folder)
    return folder


def vocab_file(name: str, cache_dir: str | None = None) -> Path:
    """A vocabulary-only GGUF file by its llama.cpp name, e.g. ``starcoder`` -> ``models/ggml-vocab-starcoder.gguf``."""
    path = llama_cpp_dir(cache_dir) / "models" / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        known = sorted(
            p.name[len("ggml-vocab-") : -len(".gguf")]
            for p in (path.parent.glob("ggml-vocab-*.gguf") if path.parent.is_dir() else [])
        )
        raise FileNotFoundError(f"llama.cpp {VERSION} has no vocabulary {name!r}; it has {known}")
    return path


# Bumped when the conversion below changes, so a cached folder from an older conversion is not reused.
_CONVERSION = 2
# GGUF token types (llama.cpp's llama_token_type): control tokens are special, user-defined ones are added text.
_CONTROL, _USER_DEFINED = 3, 4

DERIVED_VOCABULARIES: dict[str, tuple[str, dict[int, tuple[str, bool]]]] = {
    # Qwen2.5-Coder's tokenizer is Qwen2's byte-level BPE with 22 added tokens at 151643-151664 (its
    # tokenizer.json); llama.cpp's Qwen2 vocabulary has placeholders ([PAD151646] ...) at 151646-151664. The
    # texts, ids and special flags below are Qwen2.5's own (special: markup tokens; not special: tool and
    # FIM/repository tokens, which codetune's tokenizer builder makes special when it uses them).
    "qwen2.5-coder": (
        "qwen2",
        {
            **{
                151646 + k: (f"<|{name}|>", True)
                for k, name in enumerate(
                    "object_ref_start object_ref_end box_start box_end quad_start quad_end vision_start "
                    "vision_end vision_pad image_pad video_pad".split()
                )
            },
            151657: ("<tool_call>", False),
            151658: ("</tool_call>", False),
            151659: ("<|fim_prefix|>", False),
            151660: ("<|fim_middle|>", False),
            151661: ("<|fim_suffix|>", False),
            151662: ("<|fim_pad|>", False),
            151663: ("<|repo_name|>", False),
            151664: ("<|file_sep|>", False),
        },
    ),
}
"""Vocabularies llama.cpp does not ship but that are another one's with tokens renamed: name -> (the llama.cpp
vocabulary, {token id: (text, special)})."""


def tokenizer_folder(name: str, cache_dir: str | None = None) -> Path:
    """A Hugging Face tokenizer folder made from llama.cpp's vocabulary ``name`` (``starcoder``,
    ``deepseek-coder``, ``qwen2``, ...) or a derived one (:data:`DERIVED_VOCABULARIES`: ``qwen2.5-coder``),
    converted once by transformers' GGUF loader and cached: loading the folder takes milliseconds, converting the
    GGUF file seconds.

    Every token the GGUF file marks as control or user-defined is registered as an added token at its own id,
    with its own text (control tokens special). transformers' loader leaves some of them as ordinary vocabulary
    entries in byte-level spelling (DeepSeek-Coder's ``<｜fim▁begin｜>`` as ``<ï½ľfimâĸģbeginï½ľ>``), which text
    never matches, and then adds BOS/EOS again at new ids. codetune's tokenizer builder makes the family's FIM,
    repository and file tokens special where the released tokenizer has them as plain added tokens.
    """
    folder = cache_root(cache_dir) / "llama.cpp" / f"{VERSION}-tokenizers-{_CONVERSION}" / name
    if (folder / "tokenizer_config.json").is_file():
        return folder
    from transformers import AutoTokenizer  # heavy: only when a vocabulary is converted

    base, renamed = DERIVED_VOCABULARIES.get(name, (name, {}))
    gguf = vocab_file(base, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    texts, types = _gguf_tokens(gguf)
    marked = {
        i: (texts[i], kind == _CONTROL) for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)
    }
    marked.update(renamed)
    with atomic_folder(folder) as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        path.write_text(
            json.dumps(
                _with_added_tokens(json.loads(path.read_text(encoding="utf-8")), marked), ensure_ascii=False
            ),
            encoding="utf-8",
        )
        loaded = AutoTokenizer.from_pretrained(tmp)
        wrong = [(i, t) for i, (t, _) in marked.items() if loaded.convert_tokens_to_ids(t) != i]
        if len(loaded) != len(texts) or wrong:
            raise ValueError(
                f"converting llama.cpp's {gguf.name}: {len(loaded)} tokens for the file's {len(texts)}, "
                f"tokens at other ids: {wrong[:5]}"
            )
    return folder


def _gguf_tokens(path: Path) -> tuple[list[str], list[int]]:
    """The token texts and types of a GGUF vocabulary."""
    from gguf import GGUFReader  # heavy: only when a vocabulary is converted

    fields = GGUFReader(path).fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    texts = [bytes(tokens.parts[i]).decode("utf-8") for i in tokens.data]
    return texts, [int(types.parts[i][0]) for i in types.data]


def _with_added_tokens(data: dict, marked: dict[int, tuple[str, bool]]) -> dict:
    """A ``tokenizer.json`` whose added tokens are exactly ``marked`` ({id: (text, special)}), each at its id."""
    vocab = data["model"]["vocab"]
    by_id = {i: key for key, i in vocab.items()}
    for i, (text, _) in marked.items():
        key = by_id.get(i)
        if key != text and text not in vocab:
            # The added vocabulary takes a token's id from the model's entry of the same text: give it that entry.
            vocab.pop(key, None)
            vocab[text] = i
    data["added_tokens"] = [
        {
            "id": i,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (text, special) in sorted(marked.items())
    ]
    ids = {text: i for i, (text, _) in marked.items()}

    def point(node):  # the post-processor names BOS/EOS by text and id: the ids follow the text
        if isinstance(node, dict):
            if "special_tokens" in node and isinstance(node["special_tokens"], dict):
                for token in node["special_tokens"].values():
                    token["ids"] = [ids.get(t, i) for t, i in zip(token["tokens"], token["ids"], strict=True)]
            for value in node.values():
                point(value)
        elif isinstance(node, list):
            for value in node:
                point(value)

    point(data.get("post_processor"))
    return data


def reference_tokenizations(name: str, cache_dir: str | None = None) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference cases for a vocabulary: (text, token ids) pairs from its ``.inp``/``.out`` files."""
    path = vocab_file(name, cache_dir)
    # Each case is followed by a separator line; the output file has one line of ids per case.
    inputs = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    texts, lines = inputs[:-1], outputs[: len(inputs) - 1]
    if inputs[-1] or len(lines) != len(texts) or any(outputs[len(texts) :]):
        raise ValueError(f"{path.name}: reference inputs and outputs do not pair up")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=True)]


def _archive(downloads: Path) -> Path:
    """The verified sdist: ``$CODETUNE_LLAMA_CPP_SDIST``, the cached download, or a fresh download."""
    given = os.environ.get(SDIST_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise LlamaCppUnavailable(f"{SDIST_ENV}={given}: no such file")
        _verify(path)
        return path
    path = downloads / SDIST
    if path.is_file():
        _verify(path)
        return path
    url = _sdist_url()
    log.info("downloading %s %s (%s)", PACKAGE, VERSION, url)
    downloads.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        _verify(partial)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise _unavailable(f"downloading {url} failed ({err})") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return path


def _sdist_url() -> str:
    """The archive's URL from the package index's JSON simple API (PEP 691)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(
        f"{index}/{PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
    except (OSError, ValueError, KeyError) as err:
        raise _unavailable(f"the package index {index} did not answer ({err})") from None
    for entry in files:
        if entry.get("filename") == SDIST:
            return entry["url"]
    raise _unavailable(f"the package index {index} does not list {SDIST}")


def _verify(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != SHA256:
        raise ValueError(
            f"{path}: SHA-256 {digest.hexdigest()} is not the pinned {SHA256} of {SDIST}; delete it and fetch again"
        )


def _unpack(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            inner = member.name[len(_VENDOR) :] if member.name.startswith(_VENDOR) else None
            if inner and member.isfile() and inner.startswith(_KEEP):
                member.name = inner
                members.append(member)
        tar.extractall(into, members=members, filter="data")


def _unavailable(reason: str) -> LlamaCppUnavailable:
    return LlamaCppUnavailable(
        f"llama.cpp's files ({PACKAGE}=={VERSION} source archive) are not available: {reason}. On a machine with "
        f"access to PyPI run `pip download --no-deps --no-binary :all: {PACKAGE}=={VERSION}` and point "
        f"{SDIST_ENV} at the {SDIST} it writes"
    )


def main() -> None:
    """``python -m codetune.llama_cpp``: fetch, verify and unpack now; print the folder."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(llama_cpp_dir())
    except (OSError, ValueError) as err:
        raise SystemExit(f"codetune.llama_cpp: {err}") from None


if __name__ == "__main__":
    main()
    sys.exit(0)
