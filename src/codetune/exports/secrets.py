"""Credentials never leave in an export: secret-shaped strings are redacted from text, and a folder holding the
Hub token in use is refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
"""Files that hold weights only; everything else an export writes is text and is checked for secrets."""
# Keys whose values are credentials. `token` alone is not a secret marker: `pad_token`, `eos_token`,
# `trainable_token_indices`, `tokenizer` are ordinary settings.
_SECRET_KEY = re.compile(
    r"(secret|password|passwd|api_?key|private_?key|credential|^token$|^hf_token$|auth_token|access_token"
    r"|api_token|bearer|^authorization$)",
    re.IGNORECASE,
)
# Credential-shaped strings wherever they appear: Hugging Face, OpenAI-style, GitHub, AWS, Slack.
_SECRET_VALUE = re.compile(
    r"(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,})"
)


def strip_secrets(value: Any, extra: tuple[str, ...] = ()) -> Any:
    """A copy of ``value`` with credentials replaced by ``<redacted>``: secret-named keys, token-shaped
    strings, and any of the literal strings in ``extra`` (e.g. the Hub token in use)."""
    if isinstance(value, dict):
        return {
            k: REDACTED
            if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "", False)
            else strip_secrets(v, extra)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [strip_secrets(v, extra) for v in value]
    if isinstance(value, str):
        return redact_text(value, extra)
    return value


def redact_text(text: str, extra: tuple[str, ...] = ()) -> str:
    """``text`` with token-shaped strings and the literal secrets ``extra`` replaced by ``<redacted>``."""
    for secret in extra:
        if secret:
            text = text.replace(secret, REDACTED)
    return _SECRET_VALUE.sub(REDACTED, text)


def check_no_secrets(folder: Path, secrets: tuple[str, ...]) -> None:
    """Refuse an export whose text files contain a known secret (the Hub token); the folder is discarded."""
    needles = [s.encode() for s in secrets if s]
    if not needles:
        return
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            data = path.read_bytes()
            if any(n in data for n in needles):
                raise RuntimeError(
                    f"export aborted: {path.name} would contain a credential; nothing was written"
                )


def known_secrets() -> tuple[str, ...]:
    """The Hub token in use, if any, so it can be kept out of every file an export writes."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception:  # e.g. a failing OIDC exchange: then there is no token to leak either
        return ()
    return (token,) if token else ()
