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


def tokenizer_folder(name: str, cache_dir: str | None = None) -> Path:
    """A Hugging Face tokenizer folder made from llama.cpp's vocabulary ``name`` (``starcoder``,
    ``deepseek-coder``, ...), converted once by transformers' GGUF loader and cached: loading the folder takes
    milliseconds, converting the GGUF file seconds. The tokens are as the GGUF file has them; codetune's
    tokenizer builder registers the family's FIM, repository and file tokens as special where needed."""
    folder = cache_root(cache_dir) / "llama.cpp" / f"{VERSION}-tokenizers" / name
    if (folder / "tokenizer_config.json").is_file():
        return folder
    from transformers import AutoTokenizer  # heavy: only when a vocabulary is converted

    gguf = vocab_file(name, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with atomic_folder(folder) as tmp:
        tokenizer.save_pretrained(tmp)
    return folder


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
