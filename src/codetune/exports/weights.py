"""The weights of an export: merged into the base in full precision and cast, or a PEFT adapter folder."""

from __future__ import annotations

from pathlib import Path

from codetune.checkpoints.trained import trained_base_config
from codetune.data.tokenizer import fim_sentinels
from codetune.model.build import DTYPES, ModelSpec


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
    sentinels = fim_sentinels(tokenizer)
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
    base_rows = trained_base_config(spec).vocab_size
    return len(tokenizer) > base_rows
