"""Peak memory and step time of one training step's loss path: full logits vs chunked (codetune) vs libraries.

Each configuration runs in a fresh process with glibc's mmap threshold fixed (freed large blocks leave the
resident set), so the peak RSS growth of a step is the memory the step really held. The model is a Llama with a
32,016-token vocabulary (Code Llama's) and a tiny hidden size, so the loss path dominates, as it does at 16K
tokens for a 7B model (issue 20). Every loss runs through ``CausalLM.token_losses`` or the same hook:

- ``full``: ``loss_chunk_tokens: 0`` — logits of the whole row, ``.float()``, cross-entropy (codetune before);
- ``chunked``: codetune's default — output layer + cross-entropy over labelled positions, 1,024 at a time, the
  gradient taken in the forward (no logits kept, no recompute);
- ``recompute``: the same chunks under ``torch.utils.checkpoint`` (logits recomputed in the backward; the design
  of chunked losses that keep autograd's own cross-entropy);
- ``cce``: Apple's cut-cross-entropy, its CPU path (``impl="torch_compile"``) — needs ``pip install
  cut-cross-entropy`` (``--cce_path`` adds a folder it was installed into with ``pip --target``).

    python benchmarks/loss_memory.py                       # seq_len 4,096 and 16,384, every implementation
    python benchmarks/loss_memory.py --throughput          # tokens/s at 256 x 8 (quickstart shape), no loss of speed?
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20
IMPLS = ("full", "chunked", "recompute", "cce")
LONG = dict(
    model_type="llama",
    vocab_size=32016,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,  # one layer of 2 heads: attention at 16K tokens is minutes per step on one CPU thread
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=16384,
    tie_word_embeddings=False,
)
SHORT = dict(  # the quickstart's model (recipes/quickstart.yaml)
    model_type="llama",
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def loss_fn(impl: str, module, cce_path: str | None):
    """A function batch -> (differentiable sum, labelled count) for each implementation."""
    import torch

    from codetune.data.batch import IGNORE_INDEX

    if impl in ("full", "chunked"):

        def run(batch):
            out = module.token_losses(batch)
            return out.total, out.mask.sum()

        return run

    def hooked(batch, compute):
        """Run the model with its head skipped; ``compute(hidden, targets, head)`` gives the loss sum."""
        head = module.model.get_output_embeddings()
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        found = {}

        def before(mod, args):
            found["total"] = compute(args[0][:, :-1][mask], targets[mask], mod)
            return (args[0][:, :0],)

        handle = head.register_forward_pre_hook(before)
        try:
            module.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        finally:
            handle.remove()
        return found["total"], mask.sum()

    if impl == "recompute":
        from torch.utils.checkpoint import checkpoint

        def piece(h, t, head):
            # head.forward, not head(): calling the module would fire the pre-hook again.
            return torch.nn.functional.cross_entropy(head.forward(h).float(), t, reduction="sum")

        def compute(hidden, targets, head):
            chunk = 1024
            return sum(
                checkpoint(piece, hidden[i : i + chunk], targets[i : i + chunk], head, use_reentrant=False)
                for i in range(0, hidden.shape[0], chunk)
            )

        return lambda batch: hooked(batch, compute)
    if impl == "cce":
        import importlib
        import importlib.util
        import types

        # The package's __init__ imports its Triton kernels on Linux; its CPU path (torch_compile.py) needs none,
        # so the package is entered without running __init__.
        spec = importlib.util.find_spec("cut_cross_entropy") if not cce_path else None
        folder = Path(cce_path) / "cut_cross_entropy" if cce_path else Path(spec.origin).parent
        package = types.ModuleType("cut_cross_entropy")
        package.__path__ = [str(folder)]
        sys.modules["cut_cross_entropy"] = package
        cce = importlib.import_module("cut_cross_entropy.torch_compile")

        def compute(hidden, targets, head):
            return cce.torch_compile_linear_cross_entropy(hidden, head.weight, targets, reduction="sum")

        return lambda batch: hooked(batch, compute)
    raise ValueError(impl)


def worker(impl: str, seq_len: int, batch_size: int, steps: int, config: dict, cce_path: str | None) -> dict:
    import torch

    from codetune.model.build import ModelSpec
    from codetune.modules import CausalLM

    torch.manual_seed(0)
    module = CausalLM(
        model=ModelSpec(config=dict(config), init_seed=0, attn_implementation="sdpa"),
        loss_chunk_tokens=0 if impl == "full" else 1024,
    )
    module.configure_model()
    run = loss_fn(impl, module, cce_path)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (batch_size, seq_len), generator=generator)
    batch = {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.arange(seq_len).expand_as(ids).contiguous(),
    }
    baseline = rss()
    times, peaks, losses = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        total, n = run(batch)
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        peaks.append(peak_rss() - baseline)
        losses.append(float(total / n))
    return {
        "impl": impl,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "vocab": config["vocab_size"],
        "first_step_peak_growth": peaks[0],
        "peak_growth": peaks[-1],
        "step_s": times,
        "loss": losses[0],
        "threads": torch.get_num_threads(),
    }


def run(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), HF_HUB_OFFLINE="1")
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *args, "--out", out],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--seq_lens", nargs="*", type=int, default=[4096, 16384])
    parser.add_argument("--throughput", action="store_true", help="256 x 8 on the quickstart model instead")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cce_path", help="a folder cut-cross-entropy was installed into (pip --target)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--seq_len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--short", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        config = SHORT if args.short else LONG
        result = worker(args.worker, args.seq_len, args.batch_size, args.steps, config, args.cce_path)
        Path(args.out).write_text(json.dumps(result))
        return
    print(f"load average {os.getloadavg()}", flush=True)
    common = ["--steps", str(args.steps), "--threads", str(args.threads)]
    if args.cce_path:
        common += ["--cce_path", args.cce_path]
    shapes = [(256, 8, True)] if args.throughput else [(s, 1, False) for s in args.seq_lens]
    results = []
    for repeat in range(args.repeats):
        order = (
            args.impls if repeat % 2 == 0 else list(reversed(args.impls))
        )  # interleaved: drift favours none
        for seq_len, batch_size, short in shapes:
            for impl in order:
                extra = ["--short"] if short else []
                r = run(
                    [
                        "--worker",
                        impl,
                        "--seq_len",
                        str(seq_len),
                        "--batch_size",
                        str(batch_size),
                        *common,
                        *extra,
                    ]
                )
                r.update(impl=impl, seq_len=seq_len, repeat=repeat)
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"load average {os.getloadavg()}")
    print("| seq_len x rows | impl | peak growth of a step MiB | step s (median of steps 2+) | loss |")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['seq_len']} | {r['impl']} | failed: {r['error'][:80]} | | |")
            continue
        warm = r["step_s"][1:] or r["step_s"]
        print(
            f"| {r['seq_len']} x {r['batch_size']} | {r['impl']} | {r['peak_growth'] / MiB:,.0f} | "
            f"{statistics.median(warm):.3f} | {r['loss']:.5f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
