"""Peak host memory of each rank while FSDP2 loads a model: rank 0 loads, the others receive their shards.

    python benchmarks/fsdp_host_memory.py --folder /tmp/fsdp-mem-model [--every_rank]

Builds (once) a ~167M-parameter Llama saved as a Hugging Face folder (669 MB in float32), then starts 2 CPU
processes over gloo (Lightning re-runs this command line for rank 1) that load it with ``trainer.strategy: fsdp2``.
Each rank reports how much its resident memory grew during ``configure_model`` (build + shard + load: the
kernel's high-water mark, reset just before) next to the bytes of the shards it keeps. ``--every_rank`` is the
old behaviour: every rank loads the whole model before sharding. Figures: docs/scaling.md, "Host memory".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHAPE = dict(
    model_type="llama",
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32_000,
    max_position_embeddings=512,
)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--every_rank", action="store_true")
    args = parser.parse_args()
    folder = Path(args.folder)
    if not (folder / "config.json").exists():
        from transformers import AutoConfig, AutoModelForCausalLM

        values = dict(SHAPE)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)

    import lightning as L
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader

    import codetune.modules.causal as causal
    from codetune.model.build import ModelSpec
    from codetune.strategies import FSDP2Strategy

    if args.every_rank:  # what codetune did before: no rank-0 loading
        causal.is_training_checkpoint = lambda name: True

    class Measured(causal.CausalLM):
        def configure_model(self) -> None:
            if self.model is not None:
                return super().configure_model()
            before = _status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
            super().configure_model()
            peak = _status("VmHWM")
            shards = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in self.parameters())
            full = sum(p.numel() * p.element_size() for p in self.parameters())
            print(
                "MEMORY "
                + json.dumps(
                    {
                        "rank": self.global_rank,
                        "every_rank_loads": args.every_rank,
                        "model_bytes": full,
                        "shard_bytes": shards,
                        "peak_growth_bytes": peak - before,
                        "built_on_meta": getattr(self, "_build_on_meta", False),
                    }
                ),
                flush=True,
            )

    rows = [{"input_ids": torch.arange(16), "labels": torch.arange(16), "position_ids": torch.arange(16)}]
    module = Measured(model=ModelSpec(name_or_path=str(folder), attn_implementation="sdpa"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FSDP2Strategy(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    trainer.validate(module, dataloaders=DataLoader(rows, batch_size=1), verbose=False)


if __name__ == "__main__":
    main()
