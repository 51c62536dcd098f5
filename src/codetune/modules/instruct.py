"""The instruction stage: the causal LM on a chat mix with rehearsal, with the loss broken down by source.

Response-only loss needs nothing here: the chat pipeline writes ``labels`` of -100 on system and user turns, and
the base module's loss ignores them. What the stage adds is visibility: Code Llama - Instruct rehearses 6% code
and 2% natural language so instruction tuning does not erode them (Rozière et al. 2023 §2.5), and whether it
works shows only in the loss per mix source (``loss/<source>``), which one mixed loss hides.
"""

from __future__ import annotations

import torch

from codetune.data.batch import real_tokens
from codetune.modules.causal import CausalLM, masked_mean


class InstructStage(CausalLM):
    """Instruction tuning; logs ``loss/<source>`` per mix source (token-weighted) and ``target_fraction``.

    Source names come from the data module's ``source_names`` (the batch's ``source_index`` indexes them);
    without them sources are named ``source<i>``. ``target_fraction`` is the share of real tokens that carry a
    label: well below 1 on chat data, where prompts are masked.
    """

    def source_names(self) -> list[str]:
        """Names of the mix sources, in ``source_index`` order."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return list(getattr(datamodule, "source_names", None) or [])

    def extra_metrics(self, batch, out):
        if "source_index" not in batch:
            raise ValueError(
                "the instruct stage needs `source_index` in every batch (index into the data module's "
                "source_names, -1 for pad); use codetune's data module"
            )
        source = batch["source_index"][:, 1:]  # aligned with losses: source of target token t
        losses, mask = out.losses, out.mask
        names = self.source_names()
        # With the data module's names the count is known; reading the batch's largest index is a host sync.
        present = 0 if names else int(source.max()) + 1 if source.numel() else 0
        metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Every known source is reported on every batch (weight 0 when absent), so ranks log the same keys.
        for index in range(max(len(names), present)):
            name = names[index] if index < len(names) else f"source{index}"
            metrics[f"loss/{name}"] = masked_mean(losses, mask & (source == index))
        metrics["target_fraction"] = masked_mean(mask.float(), real_tokens(batch)[:, 1:])
        return metrics
