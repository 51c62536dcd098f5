"""The GPU paths in one run: at most ~8 minutes on one GPU, one JSON summary on stdout.

Checks (each reports ``ok`` and its figures; a check that cannot run here says why in ``skipped``):

1. ``packed_attention``: a packed row of several documents through the model's kernel (flash-attn 2 varlen on a
   GPU with flash-attn installed, else SDPA) against each document run alone with SDPA: max logit difference.
2. ``fsdp2_bf16``: a one-process FSDP2 run (codetune's ``shard_model``, bf16 compute, fp32 master weights):
   three training steps, loss finite and falling.
3. ``qlora_memory``: one QLoRA step's peak memory (``torch.cuda.max_memory_allocated``) against
   ``codetune plan``'s figure for the same model and shape.
4. ``throughput``: tokens/s and MFU of a ~1B random Llama at 4,096 tokens over 30 steps (bf16, flash/SDPA,
   checkpointing off).
5. ``chunked_loss``: peak memory of one training step at 16,384 tokens and a 32,016-token vocabulary, chunked
   loss against the full logits; the same loss value.

    python benchmarks/gpu_check.py            # on a GPU
    python benchmarks/gpu_check.py --dry_run  # tiny shapes on CPU (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GiB = 2**30


def llama(
    hidden: int, layers: int, heads: int, inter: int, vocab: int, kv: int | None = None
) -> dict[str, Any]:
    return dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv or heads,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )


class Env:
    def __init__(self, dry_run: bool) -> None:
        import torch

        self.dry = dry_run
        self.cuda = torch.cuda.is_available() and not dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        import torch

        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


def build(config: dict[str, Any], env: Env, **spec: Any):
    import torch

    from codetune.model.build import ModelSpec
    from codetune.modules import CausalLM

    options = spec.pop("_module", {})
    module = CausalLM(model=ModelSpec(config=dict(config), init_seed=0, **spec), **options)
    module.configure_model()
    return module.to(env.device), torch


def batch_of(vocab: int, rows: int, seq_len: int, env: Env, documents: int = 1) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    length = seq_len // documents
    position = torch.arange(seq_len) % length if documents > 1 else torch.arange(seq_len)
    labels = ids.clone()
    if documents > 1:
        labels[:, ::length] = -100  # no document is trained on another's first token
    return {
        "input_ids": ids.to(env.device),
        "labels": labels.to(env.device),
        "position_ids": position.expand(rows, seq_len).contiguous().to(env.device),
    }


def packed_attention(env: Env) -> dict[str, Any]:
    import importlib.util

    import torch

    flash = env.cuda and importlib.util.find_spec("flash_attn") is not None
    kernel = "flash_attention_2" if flash else "sdpa"
    dtype = "bfloat16" if env.cuda else "float32"
    seq, docs = (4096, 4) if not env.dry else (96, 3)
    config = llama(256, 2, 4, 512, 1024) if not env.dry else llama(32, 1, 2, 64, 128)
    packed_model, _ = build(config, env, dtype=dtype, attn_implementation=kernel)
    alone_model, _ = build(config, env, dtype=dtype, attn_implementation="sdpa")
    batch = batch_of(config["vocab_size"], 1, seq, env, documents=docs)
    length = seq // docs
    with torch.no_grad():
        packed = packed_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).float()
        worst = 0.0
        for d in range(docs):
            piece = slice(d * length, (d + 1) * length)
            alone = alone_model(
                input_ids=batch["input_ids"][:, piece], position_ids=batch["position_ids"][:, piece]
            ).float()
            worst = max(worst, float((packed[:, piece] - alone).abs().max()))
    tolerance = 0.1 if dtype == "bfloat16" else 1e-4
    return {"kernel": kernel, "documents": docs, "max_logit_diff": worst, "ok": worst <= tolerance}


def fsdp2_bf16(env: Env) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from codetune.model.sharding import shard_model

    started = not dist.is_initialized()
    store = tempfile.mkdtemp(prefix="gpu-check-")
    if started:
        dist.init_process_group(
            "nccl" if env.cuda else "gloo", init_method=f"file://{store}/store", rank=0, world_size=1
        )
    try:
        config = llama(256, 2, 4, 512, 1024) if not env.dry else llama(32, 2, 2, 64, 128)
        chunk = int(os.environ.get("GPU_CHECK_CHUNK", "1024"))
        module, _ = build(
            config, env, dtype="float32", attn_implementation="sdpa", _module={"loss_chunk_tokens": chunk}
        )
        mesh = init_device_mesh(env.device.type, (1,))
        shard_model(module.model, mesh, precision="bf16-mixed")
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        batch = batch_of(config["vocab_size"], 2, 256 if not env.dry else 32, env)
        losses = []
        for _ in range(3):
            out = module.token_losses(batch)
            loss = out.total / out.mask.sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
        sharded = all(type(p).__name__ == "DTensor" for p in module.model.parameters())
        ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] and sharded
        return {"losses": losses, "parameters_are_dtensors": sharded, "ok": ok}
    finally:
        if started:
            dist.destroy_process_group()
        shutil.rmtree(store, ignore_errors=True)


def qlora_memory(env: Env) -> dict[str, Any]:
    import torch

    from codetune.model.adapters import Adapter, Quantization
    from codetune.model.build import ModelSpec
    from codetune.modules import CausalLM
    from codetune.planner import Setup, plan_memory

    config = llama(2048, 8, 16, 5632, 32016) if not env.dry else llama(64, 2, 4, 128, 256)
    seq = 4096 if not env.dry else 64
    spec = ModelSpec(
        config=dict(config),
        init_seed=0,
        dtype="bfloat16",
        gradient_checkpointing=True,
        attn_implementation="sdpa",
        adapter=Adapter(method="lora", r=16, dropout=0.0),
        quantization=Quantization(bits=4, double_quant=True, compute_dtype="bfloat16"),
    )
    module = CausalLM(model=spec)
    module.configure_model()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batch = batch_of(config["vocab_size"], 1, seq, env)
    env.reset_peak()
    losses = []
    for _ in range(2):
        with torch.autocast(env.device.type, dtype=torch.bfloat16):
            out = module.token_losses(batch)
        (out.total / out.mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.total / out.mask.sum()))
    measured = env.peak()
    planned = plan_memory(spec, Setup(seq_len=seq, precision="bf16-mixed")).peak
    result = {"planned_gib": planned / GiB, "measured_gib": None if measured is None else measured / GiB}
    result["ok"] = all(math.isfinite(x) for x in losses) and (
        measured is None or 0.85 <= planned / measured <= 1.15
    )
    return result


def throughput(env: Env) -> dict[str, Any]:
    import torch

    from codetune.callbacks import flops_per_token, peak_flops

    config = llama(2048, 16, 16, 5632, 32016) if not env.dry else llama(32, 1, 2, 64, 128)
    seq, steps = (4096, 30) if not env.dry else (64, 3)
    kernel = "flash_attention_2" if env.cuda and _has_flash() else "sdpa"
    module, _ = build(config, env, dtype="bfloat16" if env.cuda else "float32", attn_implementation=kernel)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=env.cuda)
    batch = batch_of(config["vocab_size"], 1, seq, env)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = module.token_losses(batch)
        (out.total / out.mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if env.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[min(5, len(times) - 1) :]
    tokens_per_s = seq * len(steady) / sum(steady)
    peak = peak_flops(env.device, "bf16-mixed")
    mfu = flops_per_token(module.model, seq) * tokens_per_s / peak if peak else None
    parameters = sum(p.numel() for p in module.parameters())
    return {"parameters": parameters, "kernel": kernel, "tokens_per_s": tokens_per_s, "mfu": mfu, "ok": True}


def chunked_loss(env: Env) -> dict[str, Any]:

    config = llama(64, 1, 2, 128, 32016) if not env.dry else llama(16, 1, 2, 32, 512)
    seq = 16384 if not env.dry else 256
    results = {}
    for name, chunk in (("full", 0), ("chunked", 1024 if not env.dry else 64)):
        module, _ = build(
            config,
            env,
            dtype="bfloat16" if env.cuda else "float32",
            attn_implementation="sdpa",
            _module={"loss_chunk_tokens": chunk},
        )
        batch = batch_of(config["vocab_size"], 1, seq, env)
        env.reset_peak()
        out = module.token_losses(batch)
        (out.total / out.mask.sum()).backward()
        results[name] = {
            "peak_gib": None if env.peak() is None else env.peak() / GiB,
            "loss": float(out.total),
        }
    same = math.isclose(
        results["full"]["loss"], results["chunked"]["loss"], rel_tol=1e-2 if env.cuda else 1e-5
    )
    ratio = None
    if results["full"]["peak_gib"]:
        ratio = results["full"]["peak_gib"] / results["chunked"]["peak_gib"]
    return {**results, "full_over_chunked": ratio, "ok": same and (ratio is None or ratio > 2)}


def _has_flash() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


CHECKS = {
    "packed_attention": packed_attention,
    "fsdp2_bf16": fsdp2_bf16,
    "qlora_memory": qlora_memory,
    "throughput": throughput,
    "chunked_loss": chunked_loss,
}


def run_checks(dry_run: bool, only: list[str] | None = None) -> dict[str, Any]:
    import torch

    env = Env(dry_run)
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if env.cuda else "cpu",
        "dry_run": dry_run,
        "torch": torch.__version__,
    }
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            summary[name] = check(env)
        except Exception as error:  # one failing check must not hide the others
            summary[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
        summary[name]["seconds"] = round(time.perf_counter() - start, 1)
    summary["ok"] = all(v.get("ok") for v in summary.values() if isinstance(v, dict))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry_run", action="store_true", help="tiny shapes on CPU: the plumbing, not the figures"
    )
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), help="run only these checks")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = run_checks(args.dry_run, args.only)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
