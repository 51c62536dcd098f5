"""The planner's CPU oracle: planned peak of one training step (``codetune.planner``) against the measured one.

Each configuration runs in a fresh process (glibc's mmap threshold fixed, so freed blocks leave the resident
set): build the model from its config, then two training steps (``CausalLM.token_losses``, backward, AdamW);
the measured peak is the resident-set growth from just before the model was built to the end of the second
step (the optimizer states exist by then), so it counts weights, gradients, states, activations and the loss
buffers, as the plan does. Everything runs in fp32 (``32-true``), the one precision CPU trains in.

    python benchmarks/plan_oracle.py            # tiny and ~100M Llama, with and without checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 2**20
CONFIGS = {
    "tiny": dict(
        model_type="llama",
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    "100M": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}
CASES = [  # (config, seq_len, batch, gradient checkpointing)
    ("tiny", 2048, 2, False),
    ("tiny", 2048, 2, True),
    ("100M", 1024, 1, False),
    ("100M", 1024, 1, True),
]


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def spec_setup(name: str, seq_len: int, batch: int, checkpointing: bool):
    from codetune.model.build import ModelSpec
    from codetune.planner import Setup

    spec = ModelSpec(
        config=dict(CONFIGS[name]),
        init_seed=0,
        attn_implementation="sdpa",
        gradient_checkpointing=checkpointing,
    )
    return spec, Setup(seq_len=seq_len, batch_size=batch, precision="32-true")


def planned(name: str, seq_len: int, batch: int, checkpointing: bool) -> dict:
    from codetune.planner import plan_memory

    spec, setup = spec_setup(name, seq_len, batch, checkpointing)
    return plan_memory(spec, setup).as_dict()


def measure(name: str, seq_len: int, batch: int, checkpointing: bool) -> dict:
    import torch

    from codetune.modules import CausalLM

    torch.set_num_threads(1)
    spec, _ = spec_setup(name, seq_len, batch, checkpointing)
    ids = torch.randint(
        0, CONFIGS[name]["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(0)
    )
    batch_ = {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.arange(seq_len).expand_as(ids).clone(),
    }
    baseline = rss()
    module = CausalLM(model=spec)
    module.configure_model()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    for _ in range(2):
        out = module.token_losses(batch_)
        (out.total / out.mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured_peak": peak - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.worker:
        name, seq_len, batch, ckpt = json.loads(args.worker)
        Path(args.out).write_text(json.dumps(measure(name, seq_len, batch, ckpt)))
        return
    print(f"load average {os.getloadavg()}", flush=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), HF_HUB_OFFLINE="1")
    rows = []
    for case in CASES:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(case), "--out", out],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        measured = json.loads(Path(out).read_text())["measured_peak"]
        os.unlink(out)
        plan = planned(*case)
        rows.append({"case": case, "measured": measured, "planned": plan["peak"], "plan": plan})
        print(json.dumps(rows[-1]["case"]), measured / MiB, plan["peak"] / MiB, flush=True)
    print(
        "| model | seq_len x rows | checkpointing | parameters | planned peak MiB | measured peak MiB | planned / measured |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name, seq_len, batch, ckpt = r["case"]
        print(
            f"| {name} | {seq_len} x {batch} | {'yes' if ckpt else 'no'} | {r['plan']['parameters'] / 1e6:.1f} M | "
            f"{r['planned'] / MiB:,.0f} | {r['measured'] / MiB:,.0f} | {r['planned'] / r['measured']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
