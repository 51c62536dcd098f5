"""The long-context stage: the causal LM with rescaled RoPE, validated by perplexity at several context lengths.

Code Llama's long-context fine-tuning (Rozière et al. 2023 §2.4) raises RoPE's base period θ from 1e4 to 1e6 and
trains on 16,384-token sequences. The rescaling comes from ``model.rope`` and is written into the config before
the weights are loaded (:func:`codetune.model.build.load_model`), so the rotary tables, the trained weights and
the saved ``config.json`` agree. What this stage adds is the evidence: validation perplexity at 1×, 2×, 4× the
base's original context, on the same held-out tokens, so a run shows whether the longer context is used.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from codetune.checkpoints.trained import trained_base_config
from codetune.data.batch import real_tokens
from codetune.eval.perplexity import perplexity_by_length
from codetune.model.build import ModelSpec
from codetune.modules.causal import CausalLM
from codetune.modules.loss import DEFAULT_CHUNK_TOKENS

log = logging.getLogger(__name__)


class LongContextStage(CausalLM):
    """Long-context fine-tuning; logs ``val/ppl@{length}`` for each length in ``perplexity_multiples``."""

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        tokenizer: Any = None,
        original_length: int | None = None,
        perplexity_multiples: list[float] | None = None,
        perplexity_max_tokens: int | None = None,
        perplexity_data: str | None = None,
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        """
        Args:
            model: Which model to fine-tune; ``model.rope`` says how its RoPE is rescaled (required).
            optimizer: Optimizer class and arguments (Code Llama LCFT: AdamW, LR 2e-5).
            scheduler: Learning-rate schedule, stepped every optimizer step.
            tokenizer: Linked from the data module's tokenizer by the CLI; not set in recipes.
            original_length: Context length the base was trained at; defaults to
                ``rope.original_max_position_embeddings`` or the base config's ``max_position_embeddings``.
            perplexity_multiples: Context lengths to validate at, as multiples of ``original_length``
                (default ``[1, 2, 4]``).
            perplexity_max_tokens: Score at most this many held-out tokens per length (default: 8 windows of the
                longest length).
            perplexity_data: A text file, or a folder whose ``*.py`` files are read in sorted order, to measure
                perplexity on (concatenated, end-of-text between files). Default: the validation batches'
                non-pad tokens, concatenated in order.
            loss_chunk_tokens: Labelled positions per chunk of the output layer and loss (0: full logits).
        """
        super().__init__(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            tokenizer=tokenizer,
            loss_chunk_tokens=loss_chunk_tokens,
        )
        if self.spec.rope is None:
            raise ValueError(
                "the long-context stage needs model.rope, e.g. {type: theta, theta: 1000000} (Code Llama) or "
                "{type: yarn, factor: 4}"
            )
        multiples = list(perplexity_multiples or [1, 2, 4])
        if any(not m > 0 for m in multiples):
            raise ValueError(f"perplexity_multiples must be positive, got {multiples}")
        if original_length is not None and original_length < 2:
            raise ValueError(f"original_length must be >= 2, got {original_length}")
        if perplexity_data is not None and not Path(perplexity_data).expanduser().exists():
            raise FileNotFoundError(f"perplexity_data: {perplexity_data} does not exist")
        self.original_length = original_length
        self.perplexity_multiples = multiples
        self.perplexity_max_tokens = perplexity_max_tokens
        self.perplexity_data = perplexity_data
        self._val_tokens: list[torch.Tensor] = []

    # ---- model -----------------------------------------------------------------------------------
    def build_model(self):
        if self.original_length is None:
            self.original_length = (
                self.spec.rope.original_max_position_embeddings
                or trained_base_config(self.spec, self.tokenizer).max_position_embeddings
            )
        model = super().build_model()  # load_model writes spec.rope into the config before the weights load
        config = model.config
        log.info(
            "long-context stage: RoPE %s, max_position_embeddings %d, perplexity at %s tokens",
            config.rope_parameters,
            config.max_position_embeddings,
            self.perplexity_lengths(),
        )
        return model

    def perplexity_lengths(self) -> list[int]:
        """The context lengths validation perplexity is measured at."""
        return sorted({max(2, round(m * self.original_length)) for m in self.perplexity_multiples})

    # ---- perplexity by context length ------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        if self.perplexity_data is None:
            self._val_tokens.append(batch["input_ids"][real_tokens(batch)].detach().cpu())
        return super().validation_step(batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self._val_tokens = []

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        lengths = self.perplexity_lengths()
        stream = self._perplexity_stream()
        self._val_tokens = []
        # Every rank scores the same number of windows (sharded models run forward in lockstep): the budget is
        # the smallest rank's usable tokens, cut to a multiple of the longest length.
        usable = len(stream) // lengths[-1] * lengths[-1]
        budget = self.perplexity_max_tokens or 8 * lengths[-1]
        budget = int(
            self.trainer.strategy.reduce(
                torch.tensor(min(usable, budget), device=self.device),
                reduce_op=torch.distributed.ReduceOp.MIN,
            )
            if self.trainer.world_size > 1
            else min(usable, budget)
        )
        if budget < lengths[-1]:
            raise ValueError(
                f"long-context validation needs at least {lengths[-1]} held-out tokens (the longest of "
                f"{lengths}) but has {len(stream)}: raise data.split.max_val_rows / limit_val_batches, set "
                "perplexity_data, or lower perplexity_multiples"
            )
        report = perplexity_by_length(self.model, [stream], lengths, max_tokens=budget)
        for length in lengths:
            nll = torch.tensor(report.nll[length], device=self.device)
            if self.trainer.world_size > 1:
                nll = self.trainer.strategy.reduce(nll, reduce_op="mean")  # equal token counts per rank
            self.log(f"val/ppl@{length}", math.exp(float(nll)), on_epoch=True, sync_dist=False)

    def _perplexity_stream(self) -> torch.Tensor:
        if self.perplexity_data is None:
            return torch.cat(self._val_tokens) if self._val_tokens else torch.empty(0, dtype=torch.long)
        path = Path(self.perplexity_data).expanduser()
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        ids: list[int] = []
        for file in files:
            ids += self.tokenizer.encode(
                file.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False
            )
            ids += eos
        return torch.tensor(ids, dtype=torch.long)
