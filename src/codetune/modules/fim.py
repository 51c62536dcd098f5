"""The fill-in-the-middle stage: the causal LM, plus FIM sentinels in the tokenizer and FIM-specific metrics.

The data side lays documents out as PSM/SPM with sentinels (``codetune.data.fim``) and marks each target token's
kind in ``token_kind``; this stage checks that the sentinels are single tokens before the model is built (which
grows embedding rows for any the tokenizer added), and logs what the single loss hides: the loss on FIM documents
and on plain documents separately, and how often the model predicts the middle's next token exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from codetune.data.batch import TokenKind
from codetune.data.tokenizer import FIMSentinels, fim_sentinels
from codetune.model.build import ModelSpec
from codetune.modules.causal import CausalLM, masked_mean
from codetune.modules.loss import DEFAULT_CHUNK_TOKENS


class FIMStage(CausalLM):
    """Causal LM training on a FIM/plain mix (Code Llama §2.3, Bavarian et al. 2022).

    The sentinel set is the run tokenizer's (``data.init_args.tokenizer.sentinels``, recorded in the tokenizer);
    the stage checks that each sentinel is one token with an embedding row. Logs ``loss_fim`` (every target of a
    FIM document), ``loss_plain`` (causal documents), ``loss_middle`` and ``middle_acc`` (greedy next-token
    accuracy on the middle and its end sentinel), each weighted by its token count.
    """

    wants_correct = True  # middle_acc: the chunked loss reports where argmax equals the label

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        tokenizer: Any = None,
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        """
        Args:
            model: Which model to fine-tune and how to load it.
            optimizer: Optimizer class and arguments (``class_path`` / ``init_args``).
            scheduler: Learning-rate schedule, stepped every optimizer step.
            tokenizer: Linked from the data module's tokenizer by the CLI; not set in recipes.
            loss_chunk_tokens: Labelled positions per chunk of the output layer and loss (0: full logits).
        """
        super().__init__(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            tokenizer=tokenizer,
            loss_chunk_tokens=loss_chunk_tokens,
        )
        self.sentinels: FIMSentinels | None = None
        if tokenizer is not None:
            self._check_sentinels()

    def _check_sentinels(self) -> None:
        sentinels = fim_sentinels(self.tokenizer)
        if sentinels is None:
            raise ValueError(
                "the FIM stage needs a tokenizer with FIM sentinels; build it with the data module "
                "(data.init_args.tokenizer), which adds them"
            )
        vocab = self.tokenizer.get_vocab()
        for token in sentinels.tokens():
            ids = self.tokenizer.encode(token, add_special_tokens=False)
            if ids != [vocab[token]]:
                raise ValueError(
                    f"FIM sentinel {token!r} encodes as {ids}, not as one token; the tokenizer must treat it as "
                    "a special token (tokenizer.add_missing_sentinels: true)"
                )
        self.sentinels = sentinels

    def build_model(self):
        if self.tokenizer is None:
            raise ValueError(
                "the FIM stage needs the run's tokenizer (the CLI links it from the data module) to give its "
                "sentinels embedding rows"
            )
        self._check_sentinels()
        return super().build_model()

    def extra_metrics(self, batch, out):
        if "token_kind" not in batch:
            raise ValueError(
                "the FIM stage needs `token_kind` in every batch (0 pad, 1 plain, 2 FIM context, 3 FIM middle); "
                "use codetune's data module"
            )
        kind = batch["token_kind"][:, 1:]  # aligned with losses: kind of target token t
        losses, mask = out.losses, out.mask
        selections = {
            "loss_fim": mask & ((kind == TokenKind.FIM_CONTEXT) | (kind == TokenKind.FIM_MIDDLE)),
            "loss_plain": mask & (kind == TokenKind.PLAIN),
            "loss_middle": mask & (kind == TokenKind.FIM_MIDDLE),
        }
        metrics = {name: masked_mean(losses, selected) for name, selected in selections.items()}
        metrics["middle_acc"] = masked_mean(out.correct.float(), selections["loss_middle"])
        return metrics
