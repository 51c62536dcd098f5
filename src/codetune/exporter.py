"""``codetune export``: a training checkpoint → a Hugging Face model folder with a model card → the Hub.

Adapters are merged into a full-precision (fp32) copy of the base, never into QLoRA's 4-bit weights, then the
model is cast to the export dtype. The folder is written next to ``--out`` under a temporary name and renamed
into place once complete, so ``--out`` is never left half-written, not even when ``--overwrite`` replaces it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from codetune.checkpoints import (
    Location,
    TrainedCheckpoint,
    full_precision_spec,
    locate,
    merge_adapters,
    read_checkpoint,
    rebuild_model,
)
from codetune.model.build import DTYPES, ModelSpec, base_config
from codetune.model_card import (
    CardFacts,
    data_sources,
    decontamination,
    detect_sentinels,
    fim_settings,
    hardware,
    read_eval_results,
    read_recipe,
    redact_text,
    render_card,
    strip_secrets,
    tokens_seen,
    train_seconds,
)

log = logging.getLogger(__name__)

# Files that hold weights only; everything else an export writes is text and is checked for leaked secrets.
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def export(
    ckpt_path: str,
    out: str,
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
    adapter_only: bool = False,
    push_to_hub: str | None = None,
    private: bool = True,
    revision: str | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
    max_shard_size: str = "2GB",
    license: str | None = None,
) -> Path:
    """Export a checkpoint as a Hugging Face model folder with a model card; optionally push it to the Hub.

    Args:
        ckpt_path: A ``.ckpt`` file or a run directory (``runs/x`` or ``runs/x/lightning_logs/version_N``:
            its ``checkpoints/last.ckpt``).
        out: Folder to write. Must be empty or absent unless ``overwrite``.
        dtype: Dtype of the exported weights (adapters are merged in float32 first).
        adapter_only: Write a PEFT adapter folder (``PeftModel.from_pretrained`` loads it) instead of merged
            weights. Only for LoRA/DoRA/QLoRA runs.
        push_to_hub: Hub repository ``user/name`` to upload the folder to (token: ``HF_TOKEN`` or ``hf auth
            login``). The export stays on disk whatever happens to the upload.
        private: Create the Hub repository as private (an existing repository keeps its visibility).
        revision: Branch of the Hub repository to upload to (created if missing).
        overwrite: Replace a non-empty ``out``; the old folder is removed only once the new one is complete.
        base_model: Local folder or Hub id of the base model, when the one the checkpoint names has moved.
        max_shard_size: Largest safetensors shard, e.g. ``2GB`` or ``500MB``.
        license: Licence identifier for the card's metadata (e.g. ``apache-2.0``); default ``other``.

    Returns:
        The exported folder.
    """
    location = locate(ckpt_path)
    if location.kind != "checkpoint":
        raise ValueError(
            f"--ckpt_path {ckpt_path} is already an exported folder; to publish it use "
            "`hf upload USER/NAME {ckpt_path}`, to re-export point at the training checkpoint"
        )
    target = check_out(out, overwrite, location)
    check_shard_size(max_shard_size)
    if push_to_hub is not None:
        check_repo_id(push_to_hub)
    elif revision is not None:
        raise ValueError("--revision names a Hub branch: it needs --push_to_hub")

    checkpoint = read_checkpoint(location)
    if adapter_only and checkpoint.spec.adapter.method == "full":
        raise ValueError(
            f"--adapter_only: {location.path} is a full fine-tuning checkpoint and has no adapter; "
            "export it without --adapter_only"
        )
    spec = full_precision_spec(checkpoint.spec, base_model)  # fails here, in one line, if the base is gone
    grew = vocab_grew(spec, checkpoint.tokenizer)
    model = rebuild_model(checkpoint, base_model=base_model, merge=False)
    facts = gather_facts(checkpoint, model, dtype, adapter_only, push_to_hub or target.name, license, grew)
    secrets = _known_secrets()
    with staged_folder(target, overwrite) as tmp:
        if adapter_only:
            save_adapter(model, tmp, spec.name_or_path, save_embeddings=grew)
        else:
            save_merged(merge_adapters(model), tmp, dtype, max_shard_size, checkpoint.tokenizer)
        checkpoint.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(render_card(facts, secrets), encoding="utf-8")
        check_no_secrets(tmp, secrets)
    log.info("exported %s to %s", location.path, target)
    if push_to_hub is not None:
        push(target, push_to_hub, private=private, revision=revision)
    return target


# ---- checks before any weights are read --------------------------------------------------------------------


def check_out(out: str, overwrite: bool, source: Location) -> Path:
    """``--out`` as an absolute path; refuse a non-empty folder (unless ``overwrite``) or one holding the source."""
    target = Path(out).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder path")
    for path in (source.path, source.run_dir):
        if path is not None and (path.resolve() == target or path.resolve().is_relative_to(target)):
            raise ValueError(f"--out {out} contains the checkpoint being exported; choose another folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out} is not empty; pass --overwrite to replace it (the old folder is removed only after "
            "the new export is complete)"
        )
    return target


def check_shard_size(max_shard_size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"--max_shard_size {max_shard_size!r} is not a size; write e.g. 2GB or 500MB")


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"--push_to_hub {repo_id!r} is not a Hub repository id (user/name): {err}") from None
    if "/" not in repo_id:
        raise ValueError(f"--push_to_hub {repo_id!r}: give the owner too, as user/name or org/name")


# ---- writing --------------------------------------------------------------------------------------------


@contextmanager
def staged_folder(target: Path, overwrite: bool):
    """Yield a fresh folder next to ``target``; on success rename it to ``target``, on failure delete it.

    With ``overwrite`` the old folder is moved aside first and deleted only after the rename, so at every
    moment ``target`` is either the complete old export, the complete new one, or (for an instant) absent.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _usual_permissions(tmp)
        _publish(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _usual_permissions(folder: Path) -> None:
    """Give every file the mode a plain ``open`` would (transformers writes shards owner-only, 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        tmp.rename(target)
        return
    if any(target.iterdir()) and not overwrite:  # it was filled while we exported
        raise FileExistsError(f"--out {target} was filled while exporting; pass --overwrite to replace it")
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_merged(model, folder: Path, dtype: str, max_shard_size: str, tokenizer) -> None:
    """Sharded safetensors + config.json (RoPE, vocab size) + generation_config.json (FIM end as a stop)."""
    model.to(DTYPES[dtype])
    model.config.use_cache = True
    _add_fim_stop(model, tokenizer)
    model.save_pretrained(folder, max_shard_size=max_shard_size)


def _add_fim_stop(model, tokenizer) -> None:
    """Make the FIM end sentinel stop generation too, when it is a token of its own (Code Llama's <EOT>)."""
    from transformers import GenerationConfig

    if model.generation_config is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    sentinels = detect_sentinels(tokenizer)
    eos = model.generation_config.eos_token_id
    stops = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if sentinels is not None:
        end = tokenizer.convert_tokens_to_ids(sentinels.end)
        if end is not None and end not in stops:
            stops.append(end)
    if stops:
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops


def save_adapter(model, folder: Path, base_name: str | None, save_embeddings: bool) -> None:
    """A standard PEFT adapter folder. When the run grew the vocabulary the embedding (and output head) are
    saved too: their new rows were initialised in training, so no base can reproduce them."""
    config = model.peft_config[model.active_adapter]
    config.base_model_name_or_path = base_name
    # peft's "auto" would ask the Hub whether the base's vocabulary differs; the answer is known here.
    model.save_pretrained(folder, save_embedding_layers=save_embeddings)


def vocab_grew(spec: ModelSpec, tokenizer) -> bool:
    """Whether training added embedding rows to the base (a model built from a config never grows)."""
    if spec.config is not None:
        return False
    base_rows = base_config(spec).vocab_size
    return len(tokenizer) > base_rows


def check_no_secrets(folder: Path, secrets: tuple[str, ...]) -> None:
    """Refuse an export whose text files contain a known secret (the Hub token); the folder is discarded."""
    needles = [s.encode() for s in secrets if s]
    if not needles:
        return
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES):
            data = path.read_bytes()
            if any(n in data for n in needles):
                raise RuntimeError(
                    f"export aborted: {path.name} would contain a credential; nothing was written"
                )


def _known_secrets() -> tuple[str, ...]:
    """The Hub token in use, if any, so it can be kept out of every file an export writes."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception:  # e.g. a failing OIDC exchange: then there is no token to leak either
        return ()
    return (token,) if token else ()


# ---- model card facts ---------------------------------------------------------------------------------------


def gather_facts(
    checkpoint: TrainedCheckpoint,
    model: Any,
    dtype: str,
    adapter_only: bool,
    title: str,
    license: str | None,
    vocab_grew: bool = False,
) -> CardFacts:
    """What the card states, read from the checkpoint, the rebuilt model and the run directory."""
    run_dir = checkpoint.location.run_dir
    recipe = read_recipe(run_dir)
    config = model.config
    rope = getattr(config, "rope_parameters", None)
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad) if _is_peft(model) else 0
    return CardFacts(
        title=title,
        model_type=config.model_type,
        # Under an adapter the rebuilt base is frozen and the adapter trainable: the base is what a merge keeps.
        num_parameters=sum(p.numel() for p in model.parameters()) - adapter_params,
        adapter_parameters=adapter_params,
        vocab_size=model.get_input_embeddings().weight.shape[0],
        vocab_grew=vocab_grew,
        tokenizer_size=len(checkpoint.tokenizer),
        export_dtype=dtype,
        adaptation=describe_adaptation(checkpoint.spec, adapter_only),
        base_model=checkpoint.spec.name_or_path,
        adapter_only=adapter_only,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        rope_parameters=dict(rope) if isinstance(rope, dict) else None,
        sentinels=detect_sentinels(checkpoint.tokenizer, recipe),
        fim=fim_settings(recipe),
        sources=data_sources(recipe),
        tokens_seen=tokens_seen(recipe, checkpoint.global_step),
        decontamination=decontamination(recipe),
        hardware=hardware(recipe),
        train_seconds=train_seconds(run_dir, checkpoint.location.path),
        global_step=checkpoint.global_step,
        eval_results=read_eval_results(run_dir),
        recipe=strip_secrets(recipe, _known_secrets()) if recipe is not None else None,
        license=license,
    )


def describe_adaptation(spec: ModelSpec, adapter_only: bool) -> str:
    """One phrase: full fine-tuning, or the adapter, its rank, the quantized base, and how it was exported."""
    adapter = spec.adapter
    if adapter.method == "full":
        return "trained from scratch (all weights)" if spec.config is not None else "full fine-tuning"
    name = {"lora": "LoRA", "dora": "DoRA"}.get(adapter.method, adapter.method)
    phrase = f"{name} (r={adapter.r}, alpha={adapter.alpha:g})"
    q = spec.quantization
    if q is not None:
        kind = f"a 4-bit {q.quant_type.upper()}" if q.bits == 4 else "an 8-bit (LLM.int8)"
        phrase += f" on {kind} base" + (f" (Q{name} during training)" if q.bits == 4 else "")
    if adapter_only:
        return phrase + ", exported as the adapter alone"
    return (
        phrase
        + ", merged into a full-precision (fp32) copy of the base"
        + (", never into the quantized weights" if q is not None else "")
    )


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


# ---- the Hub ---------------------------------------------------------------------------------------------


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
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = redact_text(reason, _known_secrets())
        raise OSError(f"--push_to_hub {repo_id} failed: {reason}; {retry}") from None
    url = str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
    log.info("pushed %s to %s", folder, url)
    return url
