"""``codetune export``: a training checkpoint -> a Hugging Face model folder with a model card -> the Hub.

Adapters are merged into a full-precision (fp32) copy of the base, never into QLoRA's 4-bit weights, then the
model is cast to the export dtype (:mod:`codetune.exports.weights`); the folder is staged and published atomically
(:mod:`codetune.exports.folder`), the card states what the run recorded (:mod:`codetune.exports.card`), and no
credential is written (:mod:`codetune.exports.secrets`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from codetune.checkpoints import locate, read_checkpoint
from codetune.checkpoints.trained import (
    full_precision_spec,
    merge_adapters,
    rebuild_model,
    trained_base_config,
)
from codetune.exports.card import copy_eval_results, gather_facts, render_card
from codetune.exports.editors import write_editor_files
from codetune.exports.folder import check_out, staged_folder, write_marker
from codetune.exports.gguf import GgufOutType, check_gguf_options, export_gguf
from codetune.exports.hub import check_repo_id, push
from codetune.exports.secrets import check_no_secrets, known_secrets
from codetune.exports.weights import save_adapter, save_merged, vocab_grew

log = logging.getLogger(__name__)


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
    format: Literal["hf", "gguf"] = "hf",
    gguf_outtype: GgufOutType = "f16",
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
        overwrite: Replace a non-empty ``out`` that an earlier ``codetune export`` wrote (it holds
            ``.codetune-export.json``); never the current directory, a folder above it, a home directory or a git
            work tree. The old folder is removed only once the new one is complete.
        base_model: Local folder or Hub id of the base model, when the one the checkpoint names has moved.
        max_shard_size: Largest safetensors shard, e.g. ``2GB`` or ``500MB``.
        license: Licence identifier for the card's metadata (e.g. ``apache-2.0``); default ``other``.
        format: ``hf`` (the Hugging Face folder) or ``gguf``: the folder plus ``gguf/`` with a GGUF file for
            llama.cpp / Ollama / Tabby (FIM tokens checked), an Ollama ``Modelfile`` and a Tabby model folder; the
            card gains a "use it in your editor" section (docs/export.md).
        gguf_outtype: GGUF weight type: ``f16``, ``bf16``, ``q8_0``, ``f32``; K-quants (``q4_k_m``, ...) need
            llama.cpp's ``llama-quantize`` on ``PATH``.

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

    if format == "gguf" and adapter_only:
        raise ValueError("--format gguf needs the merged model: export without --adapter_only")
    checkpoint = read_checkpoint(location)
    if (
        format == "gguf"
    ):  # the converter supports the architecture and the output type, before any weights load
        config = trained_base_config(checkpoint.spec)
        architecture = (config.architectures or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)])[0]
        check_gguf_options(gguf_outtype, architecture)
    if adapter_only and checkpoint.spec.adapter.method == "full":
        raise ValueError(
            f"--adapter_only: {location.path} is a full fine-tuning checkpoint and has no adapter; "
            "export it without --adapter_only"
        )
    spec = full_precision_spec(checkpoint.spec, base_model)  # fails here, in one line, if the base is gone
    grew = vocab_grew(spec, checkpoint.tokenizer)
    model = rebuild_model(checkpoint, base_model=base_model, merge=False)
    facts = gather_facts(
        checkpoint, model, dtype, adapter_only, push_to_hub or target.name, license, grew, base_model
    )
    secrets = known_secrets()
    with staged_folder(target, overwrite) as tmp:
        write_marker(tmp, location.path)
        if adapter_only:
            save_adapter(model, tmp, spec.name_or_path, save_embeddings=grew)
        else:
            save_merged(merge_adapters(model), tmp, dtype, max_shard_size, checkpoint.tokenizer)
        checkpoint.tokenizer.save_pretrained(tmp)
        extra = []
        if format == "gguf":
            name = target.name
            gguf = export_gguf(
                tmp, tmp / "gguf" / f"{name}.{gguf_outtype}.gguf", gguf_outtype, name, facts.sentinels
            )
            # An upload would send the GGUF twice through Tabby's folder: that copy only stays for local use.
            extra.append(write_editor_files(gguf, tmp / "gguf", tabby_weights=push_to_hub is None).section)
        copy_eval_results(facts, tmp)
        (tmp / "README.md").write_text(render_card(facts, secrets, extra), encoding="utf-8")
        check_no_secrets(tmp, secrets)
    log.info("exported %s to %s", location.path, target)
    if push_to_hub is not None:
        push(target, push_to_hub, private=private, revision=revision)
    return target


def check_shard_size(max_shard_size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"--max_shard_size {max_shard_size!r} is not a size; write e.g. 2GB or 500MB")
