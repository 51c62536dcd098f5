"""Publishing an export on the Hugging Face Hub."""

from __future__ import annotations

import logging
from pathlib import Path

from codetune.errors import first_line
from codetune.exports.secrets import known_secrets, redact_text

log = logging.getLogger(__name__)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"--push_to_hub {repo_id!r} is not a Hub repository id (user/name): {err}") from None
    if "/" not in repo_id:
        raise ValueError(f"--push_to_hub {repo_id!r}: give the owner too, as user/name or org/name")


def push(folder: Path, repo_id: str, private: bool = True, revision: str | None = None) -> str:
    """Upload ``folder`` to the Hub repository ``repo_id`` (created if missing); returns the commit URL.

    The token is huggingface_hub's own lookup (``HF_TOKEN``, then the ``hf auth login`` cache); codetune never
    reads it into a message, a log line or a file.
    """
    from huggingface_hub import HfApi, get_token

    retry = f"the export is kept at {folder}; upload it later with `hf upload {repo_id} {folder}`"
    if not get_token():
        raise PermissionError(
            f"--push_to_hub {repo_id}: no Hugging Face token found (set HF_TOKEN or run `hf auth login`); {retry}"
        )
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message="Upload model exported by codetune",
        )
    except Exception as err:  # network, auth, offline mode: one line, secrets removed, export kept
        reason = first_line(err)
        reason = redact_text(reason, known_secrets())
        raise OSError(f"--push_to_hub {repo_id} failed: {reason}; {retry}") from None
    url = str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
    log.info("pushed %s to %s", folder, url)
    return url
