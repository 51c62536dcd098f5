"""The fill-in-the-middle stage: the causal LM, plus FIM sentinels in the tokenizer and FIM-specific metrics.

The data side lays documents out as PSM/SPM with sentinels (``codetune.data.fim``) and marks each target token's
kind in ``token_kind``; this stage makes sure the sentinels are single tokens with embedding rows before the
model is built, and logs what the single loss hides: the loss on FIM documents and on plain documents
separately, and how often the model predicts the middle's next token exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from codetune.data.batch import TokenKind
from codetune.data.tokenizer import FIMSentinels, ensure_sentinels, resolve_sentinels
from codetune.model.build import ModelSpec
from codetune.modules.causal import CausalLM, masked_mean

log = logging.getLogger(__name__)


class FIMStage(CausalLM):
    """Causal LM training on a FIM/plain mix (Code Llama §2.3, Bavarian et al. 2022).

    Logs ``loss_fim`` (every target of a FIM document), ``loss_plain`` (causal documents), ``loss_middle`` and
    ``middle_acc`` (greedy next-token accuracy on the middle and its end sentinel), each weighted by its token
    count.
    """

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        tokenizer: Any = None,
        sentinels: str | FIMSentinels = "codellama",
    ) -> None:
        """
        Args:
            model: Which model to fine-tune and how to load it.
            optimizer: Optimizer class and arguments (``class_path`` / ``init_args``).
            scheduler: Learning-rate schedule, stepped every optimizer step.
            tokenizer: Linked from the data module's tokenizer by the CLI; not set in recipes.
            sentinels: FIM sentinel set the data is laid out with: ``codellama``, ``codellama-hf``, ``starcoder`` or custom
                strings. Must match the data module's tokenizer sentinels.
        """
        super().__init__(model=model, optimizer=optimizer, scheduler=scheduler, tokenizer=tokenizer)
        self.sentinels = resolve_sentinels(sentinels)
        self.sentinel_ids: dict[str, int] = {}
        if tokenizer is not None:
            self._ensure_sentinels()

    def _ensure_sentinels(self) -> None:
        # Before the model is built, so the embedding grows (mean-initialised, trainable) rows for new sentinels.
        added = ensure_sentinels(self.tokenizer, self.sentinels, add=True)
        if added:
            log.info("FIM stage added sentinels %s to the tokenizer", added)
        vocab = self.tokenizer.get_vocab()
        self.sentinel_ids = {token: vocab[token] for token in self.sentinels.tokens()}
        for token in self.sentinels.tokens():
            ids = self.tokenizer.encode(token, add_special_tokens=False)
            if ids != [vocab[token]]:
                raise ValueError(
                    f"FIM sentinel {token!r} encodes as {ids}, not as one token; the tokenizer must treat it as "
                    "a special token (tokenizer.add_missing_sentinels: true)"
                )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        spec = getattr(datamodule, "tokenizer_spec", None)
        if spec is not None and resolve_sentinels(spec.sentinels) != self.sentinels:
            raise ValueError(
                f"model.init_args.sentinels ({self.sentinels.tokens()}) differ from the data tokenizer's "
                f"({resolve_sentinels(spec.sentinels).tokens()}): set both to the same sentinel set"
            )

    def build_model(self):
        if self.tokenizer is None:
            raise ValueError(
                "the FIM stage needs the run's tokenizer (the CLI links it from the data module) to give its "
                "sentinels embedding rows"
            )
        self._ensure_sentinels()
        return super().build_model()

    def extra_metrics(self, batch, losses, mask, logits):
        if "token_kind" not in batch:
            raise ValueError(
                "the FIM stage needs `token_kind` in every batch (0 pad, 1 plain, 2 FIM context, 3 FIM middle); "
                "use codetune's data module"
            )
        kind = batch["token_kind"][:, 1:]  # aligned with losses: kind of target token t
        targets = batch["labels"][:, 1:]
        selections = {
            "loss_fim": mask & ((kind == TokenKind.FIM_CONTEXT) | (kind == TokenKind.FIM_MIDDLE)),
            "loss_plain": mask & (kind == TokenKind.PLAIN),
            "loss_middle": mask & (kind == TokenKind.FIM_MIDDLE),
        }
        metrics = {name: masked_mean(losses, selected) for name, selected in selections.items()}
        correct = (logits[:, :-1].argmax(-1) == targets).float()
        metrics["middle_acc"] = masked_mean(correct, selections["loss_middle"])
        return metrics
