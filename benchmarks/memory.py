"""Memory of a ~100M-parameter Llama under full bf16, LoRA bf16 and QLoRA (NF4 + double quantization), on CPU.

The model is built from a config (no download): vocab 32,000, hidden 768, intermediate 2,048, 12 layers, 12
attention heads (12 KV heads, head dim 64), tied input/output embeddings (109.5 M parameters); it is saved once,
in bf16 safetensors, to a temporary folder. Each configuration is then loaded from that checkpoint through
codetune's own path (``codetune.model.build.load_model(ModelSpec(...))``, the code a recipe runs), in a fresh
process, and reports:

- weight bytes of the decoder's linear layers (q/k/v/o/gate/up/down of every block: what QLoRA quantizes; the
  output head is the tied embedding, which is not quantized), counting a 4-bit layer's packed weight plus its
  quantization state (block scales, nested scales, code tables) as ``QuantState.as_dict(packed=True)`` saves
  it; LoRA's A/B matrices separately;
- ``get_memory_footprint()`` of the whole model (parameters + buffers, as transformers counts them);
- peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after the imports, after loading (every tensor read
  once, since transformers may leave bf16 weights memory-mapped and unread) and after one training step
  (forward + backward + AdamW over the trainable parameters on ``--train_tokens`` tokens);
- the peak *anonymous* memory while loading, sampled from ``/proc/self/status``: ``ru_maxrss`` also counts the
  checkpoint's memory-mapped pages, which are page cache being read, not a copy of the model.

Loading QLoRA from a checkpoint quantizes tensor by tensor as transformers reads them: if the bf16 model were
materialised first, the peak anonymous memory would exceed what is left after loading. The extra row
``qlora_from_config`` is a freshly initialised model (``model.config`` in a recipe): there is no checkpoint to
stream from, so codetune builds it in bf16 and quantizes a saved copy, and the bf16 model is materialised.

    python benchmarks/memory.py
    python benchmarks/memory.py --configs bf16 qlora --train_tokens 0     # loading only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bitsandbytes' CPU path would look for kernels on the Hub

MODEL_CONFIG = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
CONFIGS = ("bf16", "lora", "qlora", "qlora_from_config")
MiB = 2**20


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_parts() -> dict[str, int]:
    """This process's resident memory now, bytes: anonymous (heap, tensors) and file-backed (memory-mapped
    safetensors, shared libraries; page cache the kernel can drop)."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                parts[key] = int(value.split()[0]) * 1024
    return parts


class RssSampler(threading.Thread):
    """Samples :func:`rss_parts` every few milliseconds, for the peak *anonymous* memory of a phase:
    ``ru_maxrss`` also counts the checkpoint's memory-mapped pages, which are page cache, not a copy."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_anon = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak_anon = max(self.peak_anon, rss_parts()["RssAnon"])
            time.sleep(self.interval)

    def restart(self) -> int:
        """Start a new peak from now; returns the anonymous memory now."""
        now = rss_parts()["RssAnon"]
        self.peak_anon = now
        return now

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak_anon, rss_parts()["RssAnon"])


def spec_for(name: str, checkpoint: str):
    """The ModelSpec a recipe would write for each configuration."""
    from codetune.model.adapters import Adapter, Quantization
    from codetune.model.build import ModelSpec

    lora = Adapter(method="lora", r=16, alpha=32.0, dropout=0.0)
    nf4 = Quantization(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    source = {"name_or_path": checkpoint}
    if name == "qlora_from_config":
        source = {"config": dict(MODEL_CONFIG)}
    return ModelSpec(
        **source,
        dtype="bfloat16",
        attn_implementation="sdpa",
        adapter=lora if name != "bf16" else Adapter(),
        quantization=nf4 if name.startswith("qlora") else None,
    )


def logical_numel(param) -> int:
    """Weights a parameter stands for: a 4-bit parameter packs two per byte, its ``numel`` counts bytes."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def linear_bytes(model) -> dict[str, int]:
    """Bytes of the decoder blocks' linear weights (frozen base, with any 4-bit state) and of LoRA's A/B."""
    import torch

    try:
        import bitsandbytes as bnb

        four_bit = (bnb.nn.Linear4bit,)
    except ImportError:  # pragma: no cover - bitsandbytes is a codetune dependency
        four_bit = ()
    base = adapter = params = quant_state = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        tensors = [module.weight] + ([module.bias] if module.bias is not None else [])
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if ".lora_" in name:
            adapter += nbytes
        elif ".layers." in name:
            params += module.in_features * module.out_features
            if isinstance(module, four_bit):
                state = module.weight.quant_state.as_dict(packed=True)
                state_bytes = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
                quant_state += state_bytes
                nbytes += state_bytes
            base += nbytes
    return {
        "linear_base_bytes": base,
        "linear_params": params,
        "adapter_bytes": adapter,
        "quant_state_bytes": quant_state,
    }


def worker(name: str, checkpoint: str, train_tokens: int) -> dict:
    import bitsandbytes  # noqa: F401  (imported by every configuration, so the baseline is the same)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from codetune.model.build import load_model

    torch.manual_seed(0)
    spec = spec_for(name, checkpoint)
    baseline, baseline_parts = peak_rss(), rss_parts()
    sampler = RssSampler()
    sampler.start()
    phase = watch_from_pretrained(sampler)
    start = time.perf_counter()
    model = load_model(spec)
    load_s = time.perf_counter() - start
    # transformers may leave weights memory-mapped and unread: read every tensor once, so what is resident
    # after loading is the whole model.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()  # reads it without a copy (a .float() here would add a peak of its own)
    peak_anon_load = sampler.stop()
    after_load, after_parts = peak_rss(), rss_parts()
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base_model.get_input_embeddings().weight
    result = {
        "config": name,
        "parameters": sum(logical_numel(p) for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "footprint_bytes": base_model.get_memory_footprint(),
        # peft's prepare_model_for_kbit_training upcasts every non-quantized weight to float32 under QLoRA.
        "embedding_bytes": embedding.numel() * embedding.element_size(),
        "embedding_dtype": str(embedding.dtype).removeprefix("torch."),
        **linear_bytes(model),
        "baseline_rss": baseline,
        "baseline_anon": baseline_parts["RssAnon"],
        "baseline_file": baseline_parts["RssFile"],
        "peak_rss_load": after_load,
        "peak_anon_load": peak_anon_load,
        "from_pretrained_peak_anon_growth": phase.get("peak_growth"),
        "anon_after_load": after_parts["RssAnon"],
        "file_after_load": after_parts["RssFile"],
        "load_s": load_s,
    }
    if train_tokens:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(
            0, MODEL_CONFIG["vocab_size"], (1, train_tokens), generator=torch.Generator().manual_seed(0)
        )
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        result["train_step_s"] = time.perf_counter() - start
        result["peak_rss_train"] = peak_rss()
        result["loss"] = float(loss)
    return result


def watch_from_pretrained(sampler: RssSampler) -> dict[str, int]:
    """Record the peak anonymous growth inside ``AutoModelForCausalLM.from_pretrained`` (where a quantized base is
    read and quantized), apart from what load_model does after it (peft's preparation, adapters)."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained
    phase: dict[str, int] = {}

    def watched(*args, **kwargs):
        start = sampler.restart()
        model = original(*args, **kwargs)
        phase["peak_growth"] = max(sampler.peak_anon, rss_parts()["RssAnon"]) - start
        return model

    AutoModelForCausalLM.from_pretrained = staticmethod(watched)
    return phase


def save_checkpoint(folder: str) -> dict:
    """The random bf16 model the configurations load, written once as safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(MODEL_CONFIG)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return {"parameters": sum(p.numel() for p in model.parameters()), "safetensors_bytes": size}


def run(args: list[str], default_malloc: bool = False) -> dict:
    """One worker in a fresh process (peak RSS is per process).

    glibc raises its mmap threshold as large blocks are freed, and from then on keeps freed blocks of that size
    mapped: how much freed memory still counts as resident then varies from run to run (the QLoRA load's peak
    moved between 81 and 209 MiB over seven runs). A fixed threshold returns large blocks when they are freed, so
    the numbers are the memory actually live (stable to a few MiB); ``default_malloc`` measures glibc as is.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ)
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *args, "--out", out],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{args} failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def table(results: list[dict], saved: dict) -> str:
    """The Markdown tables of docs/performance.md."""
    bf16 = next((r for r in results if r["config"] == "bf16"), None)
    lines = [
        "| config | parameters (trainable) | linear weights MiB | x bf16 | LoRA A/B MiB | embedding MiB (dtype) | "
        "footprint MiB | peak RSS MiB: imports / after load / after a train step | load s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r['linear_base_bytes'] / bf16['linear_base_bytes']:.3f}" if bf16 else "-"
        train = f" / {r['peak_rss_train'] / MiB:,.0f}" if "peak_rss_train" in r else ""
        lines.append(
            f"| {r['config']} | {r['parameters'] / 1e6:.1f} M ({r['trainable'] / 1e6:.2f} M) | "
            f"{r['linear_base_bytes'] / MiB:,.1f} | {ratio} | {r['adapter_bytes'] / MiB:.2f} | "
            f"{r['embedding_bytes'] / MiB:,.1f} ({r['embedding_dtype']}) | {r['footprint_bytes'] / MiB:,.1f} | "
            f"{r['baseline_rss'] / MiB:,.0f} / {r['peak_rss_load'] / MiB:,.0f}{train} | {r['load_s']:.1f} |"
        )
    lines += [
        "",
        f"Loading, against the bf16 checkpoint's {saved['safetensors_bytes'] / MiB:,.1f} MiB:",
        "",
        "| config | model tensors MiB | peak RSS growth MiB | peak anonymous growth MiB: in from_pretrained / "
        "whole load | growth left after load: anonymous + file-backed MiB |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        tensors = r["footprint_bytes"] + r["quant_state_bytes"]
        inside = r["from_pretrained_peak_anon_growth"]
        inside = "-" if inside is None else f"{inside / MiB:,.0f}"
        lines.append(
            f"| {r['config']} | {tensors / MiB:,.1f} | {(r['peak_rss_load'] - r['baseline_rss']) / MiB:,.0f} | "
            f"{inside} / "
            f"{(r['peak_anon_load'] - r['baseline_anon']) / MiB:,.0f} | "
            f"{(r['anon_after_load'] - r['baseline_anon']) / MiB:,.0f} + "
            f"{(r['file_after_load'] - r['baseline_file']) / MiB:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument(
        "--train_tokens", type=int, default=128, help="tokens of the one training step (0: none)"
    )
    parser.add_argument(
        "--default_malloc",
        action="store_true",
        help="measure with glibc's dynamic mmap threshold (noisier: freed blocks may stay resident)",
    )
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--worker", choices=[*CONFIGS, "save"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (
            save_checkpoint(args.checkpoint)
            if args.worker == "save"
            else worker(args.worker, args.checkpoint, args.train_tokens)
        )
        Path(args.out).write_text(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="codetune-memory-") as checkpoint:
        saved = run(["--worker", "save", "--checkpoint", checkpoint])
        shape = ", ".join(f"{k} {v}" for k, v in MODEL_CONFIG.items())
        print(
            f"model: {shape}\nparameters: {saved['parameters']:,}; bf16 safetensors checkpoint "
            f"{saved['safetensors_bytes'] / MiB:,.1f} MiB\nload average {os.getloadavg()}",
            flush=True,
        )
        results = []
        for name in args.configs:
            r = run(
                ["--worker", name, "--checkpoint", checkpoint, "--train_tokens", str(args.train_tokens)],
                args.default_malloc,
            )
            results.append(r)
            print(json.dumps(r), flush=True)
    print(table(results, saved))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": saved, "results": results}, indent=1))


if __name__ == "__main__":
    main()
