"""Training throughput on CPU: codetune vs Hugging Face ``Trainer`` (padding) vs TRL ``SFTTrainer`` (packing) vs
a bare PyTorch loop over codetune's own packed batches.

The same work for all four: the quickstart recipe's tiny Llama (same initial weights), the same stdlib documents
(the quickstart's training split, FIM off so every runner does plain causal LM), the same sequence length, batch
(rows x seq_len token slots per optimizer step), number of optimizer steps, AdamW (the recipe's lr, betas and
weight decay, ``torch.optim.AdamW``), warm-up + cosine schedule, gradient clipping at 1.0, fp32, SDPA attention
and torch threads. Each runner is a fresh process on a pseudo-terminal, as a user runs it from a shell
(progress bars draw). The runners are interleaved (a b c d, d c b a, ...) so load from other jobs on the
machine, even a drifting one, hits them alike; ratios are taken within each repetition.

- ``codetune``: ``codetune.fit(recipe, overrides)``, i.e. ``codetune fit --config recipes/quickstart.yaml`` with
  its defaults (Rich progress bar, Throughput callback, CSV logger, atomic ``last.ckpt`` at the end); validation
  is off (``limit_val_batches=0``) because the others do not validate.
- ``hf_trainer``: one document per row, truncated to ``seq_len``, ``DataCollatorForLanguageModeling(mlm=False)``
  (pads each batch to its longest row), ``Trainer`` with tqdm on.
- ``trl_packing``: ``SFTTrainer`` with ``SFTConfig(packing=True, max_length=seq_len)`` (TRL's default ``bfd``
  packing, which turns on padding-free batches). TRL's own defaults ``bf16=True`` and
  ``gradient_checkpointing=True`` are set to False: they would change the work, not the overhead.
- ``bare``: ``for batch in codetune's train loader: forward(input_ids, position_ids, use_cache=False)``, mean
  token cross-entropy, ``backward``, clip, ``AdamW.step``, schedule step; no logging. The practical limit.

Measured per run: wall time of the process (imports, setup, training, saving), and over the steady state (the
optimizer steps after ``--warmup``, from the end of step ``warmup`` to the end of the last) real tokens per
second, real meaning not padding (codetune/bare: ``token_kind != 0``; HF: ``attention_mask``; TRL padding-free:
every position of its flattened batch).

    python benchmarks/train_throughput.py --threads 2 --repeats 4          # quickstart: seq_len 256, 8 rows/step
    python benchmarks/train_throughput.py --threads 2 --repeats 4 --seq_len 1024 --batch_size 2
    python benchmarks/train_throughput.py --runners codetune bare --repeats 8
    python benchmarks/train_throughput.py --profile --threads 2          # py-spy: where each runner's time goes

Results and their reading: docs/performance.md, "Training throughput".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from codetune.data.batch import real_tokens as batch_real_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the runners fork no tokenizing workers

REPO = Path(__file__).resolve().parent.parent
RUNNERS = ("codetune", "hf_trainer", "trl_packing", "bare")


@dataclass
class Settings:
    """What every runner is given; serialised to the worker processes."""

    recipe: str
    seq_len: int
    batch_size: int
    steps: int
    warmup: int
    threads: int
    workdir: str
    """Shared files the prepare step writes: tokenizer/, model/ (initial weights) and train.jsonl."""
    codetune_overrides: list[str]
    """Extra recipe overrides for the codetune runner only (to find where its time goes)."""

    def overrides(self, run_dir: str) -> list[str]:
        """Recipe overrides common to codetune and the bare loop."""
        return [
            f"--data.init_args.seq_len={self.seq_len}",
            f"--data.init_args.batch_size={self.batch_size}",
            "--data.init_args.fim=null",
            f"--trainer.max_steps={self.steps}",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={run_dir}",
        ]


# ---- measurement helpers (shared by the runners) -----------------------------------------------------------


class StepTimes:
    """End time of every optimizer step and the real tokens it trained on."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens: list[int] = []

    def steady(self, warmup: int) -> dict[str, float]:
        """Rates over the steps after ``warmup`` (at least 1): from the end of step ``warmup`` to the end of the
        last. ``real_tok_s`` is the whole window's (every periodic cost included); ``median_real_tok_s`` is the
        median step's, which a burst of load from other jobs moves less."""
        n = len(self.ends)
        if not 1 <= warmup < n:
            raise RuntimeError(f"{n} steps recorded; need more than the {warmup} warm-up steps (at least 1)")
        durations = [b - a for a, b in zip(self.ends[warmup - 1 : -1], self.ends[warmup:], strict=True)]
        tokens = self.tokens[warmup:n]
        seconds = self.ends[-1] - self.ends[warmup - 1]
        median_step = statistics.median(durations)
        return {
            "steady_s": seconds,
            "steady_steps": n - warmup,
            "real_tokens": sum(tokens),
            "real_tok_s": sum(tokens) / seconds,
            "median_step_s": median_step,
            "median_real_tok_s": statistics.median(tokens) / median_step,
            "step_s": durations,
            "batches_built": len(self.tokens),
        }


def real_tokens(batch: dict) -> int:
    """Non-padding token positions of a batch, for any runner's batch layout (TRL padding-free: one flattened
    row, unpadded, so every position counts)."""
    return int(batch_real_tokens(batch).sum())


class CountingCollator:
    """Wraps a Hugging Face data collator and records the real tokens of every batch it builds (with
    ``dataloader_num_workers=0`` and no gradient accumulation, batch ``i`` is optimizer step ``i``)."""

    def __init__(self, inner, times: StepTimes) -> None:
        self.inner, self.times = inner, times

    def __call__(self, features):
        batch = self.inner(features)
        self.times.tokens.append(real_tokens(batch))
        return batch


def hf_clock(times: StepTimes):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.ends.append(time.perf_counter())

    return Clock()


def __getattr__(name: str):
    """``train_throughput.LightningClock``, the callback the codetune runner adds to the recipe
    (``--trainer.callbacks+=train_throughput.LightningClock``); built on first use so that the other runners'
    processes never import Lightning (their wall time would include it)."""
    if name != "LightningClock":
        raise AttributeError(name)
    import lightning as L

    class LightningClock(L.Callback):
        """Step end times and real tokens inside a codetune run."""

        def __init__(self) -> None:
            self.times = StepTimes()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.tokens.append(real_tokens(batch))
            self.times.ends.append(time.perf_counter())

    LightningClock.__module__ = __name__
    globals()[name] = LightningClock
    return LightningClock


# ---- the runners (each in its own process) -----------------------------------------------------------------


def prepare(s: Settings) -> dict:
    """Build (or load) codetune's data cache and write what the HF/TRL runners load as a user would: the
    tokenizer, the initial model and the training documents as JSONL. Also describes the model."""
    from codetune.commands.fit import CodetuneCLI

    cli = CodetuneCLI(args=["--config", s.recipe, *s.overrides(os.path.join(s.workdir, "runs"))], run=False)
    dm = cli.datamodule
    dm.setup("fit")
    cli.model.configure_model()
    model = cli.model.model
    work = Path(s.workdir)
    dm.tokenizer.save_pretrained(work / "tokenizer")
    model.save_pretrained(work / "model")
    data = dm.corpus.dataset.select_columns(["split", "text"])
    texts = [t for split, t in zip(data["split"], data["text"], strict=True) if split == "train"]
    with open(work / "train.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    c = model.config
    return {
        "model": (
            f"Llama, vocab {c.vocab_size}, hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
            f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads ({c.num_key_value_heads} KV), "
            f"tied embeddings {c.tie_word_embeddings}"
        ),
        "parameters": sum(p.numel() for p in model.parameters()),
        "documents": len(texts),
        "packed_rows": len(dm.train_rows),
        "packed_real_fraction": dm.train_summary.real_fraction,
    }


def run_codetune(s: Settings) -> dict:
    import codetune

    run_dir = tempfile.mkdtemp(dir=s.workdir)
    result = codetune.fit(
        s.recipe,
        overrides=[
            *s.overrides(run_dir),
            *s.codetune_overrides,
            "--trainer.callbacks+=train_throughput.LightningClock",
        ],
    )
    clock = next(c for c in result.trainer.callbacks if type(c).__name__ == "LightningClock")
    return {**clock.times.steady(s.warmup), "final_loss": result.metrics.get("train/loss")}


def _recipe_optimizer(s: Settings) -> dict:
    """The recipe's AdamW and schedule arguments, so HF and TRL get the same ones."""
    import yaml

    recipe = yaml.safe_load(Path(s.recipe).read_text())
    opt = recipe["model"]["init_args"]["optimizer"]["init_args"]
    sched = recipe["model"]["init_args"]["scheduler"]["init_args"]
    return {
        "learning_rate": float(opt["lr"]),
        "adam_beta1": float(opt["betas"][0]),
        "adam_beta2": float(opt["betas"][1]),
        "weight_decay": float(opt["weight_decay"]),
        "warmup_steps": int(sched.get("warmup_steps", 0)),
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 1 / 30},  # codetune.optim.WarmupCosine's floor
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",  # torch.optim.AdamW, as the recipe (transformers' default is the fused kernel)
    }


def _common_hf_args(s: Settings, run_dir: str) -> dict:
    return {
        "output_dir": run_dir,
        "per_device_train_batch_size": s.batch_size,
        "max_steps": s.steps,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        **_recipe_optimizer(s),
    }


def run_hf_trainer(s: Settings) -> dict:
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    work = Path(s.workdir)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa")
    data = load_dataset("json", data_files=str(work / "train.jsonl"), split="train")
    data = data.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=s.seq_len),
        batched=True,
        remove_columns=["text"],
    )
    times = StepTimes()
    args = TrainingArguments(**_common_hf_args(s, tempfile.mkdtemp(dir=s.workdir)))
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False), times)
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[hf_clock(times)]
    )
    out = trainer.train()
    return {**times.steady(s.warmup), "final_loss": _last_logged_loss(trainer, out)}


def run_trl_packing(s: Settings) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    work = Path(s.workdir)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa")
    data = load_dataset("json", data_files=str(work / "train.jsonl"), split="train")
    times = StepTimes()
    config = SFTConfig(
        packing=True,
        max_length=s.seq_len,
        bf16=False,
        gradient_checkpointing=False,
        **_common_hf_args(s, tempfile.mkdtemp(dir=s.workdir)),
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[hf_clock(times)]
    )
    trainer.data_collator = CountingCollator(trainer.data_collator, times)
    out = trainer.train()
    return {**times.steady(s.warmup), "final_loss": _last_logged_loss(trainer, out)}


def _last_logged_loss(trainer, out) -> float | None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return float(losses[-1]) if losses else float(out.training_loss)


def run_bare(s: Settings) -> dict:
    import torch

    from codetune.commands.fit import CodetuneCLI

    cli = CodetuneCLI(args=["--config", s.recipe, *s.overrides(tempfile.mkdtemp(dir=s.workdir))], run=False)
    torch.manual_seed(0)
    module = cli.model
    module.configure_model()
    model = module.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = module.optimizer_factory(params)
    scheduler = module.scheduler_factory(optimizer) if module.scheduler_factory else None
    if scheduler is not None and getattr(scheduler, "total_steps", 0) is None:
        scheduler.total_steps = s.steps
    times = StepTimes()
    loss = bare_loop(model, cli.datamodule.train_dataloader, optimizer, scheduler, s.steps, times)
    return {**times.steady(s.warmup), "final_loss": loss}


def shifted_cross_entropy(logits, labels):
    """Mean next-token cross-entropy: logits at t predict label t+1, -100 ignored."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def bare_loop(model, loader, optimizer, scheduler, steps: int, times: StepTimes) -> float:
    """Forward, mean token cross-entropy, backward, clip, AdamW step, schedule step; nothing else."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    step, loss = 0, torch.tensor(float("nan"))
    while step < steps:
        for batch in loader():
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
            loss = shifted_cross_entropy(logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            times.tokens.append(real_tokens(batch))
            times.ends.append(time.perf_counter())
            step += 1
            if step == steps:
                break
    return float(loss)


WORKERS = {
    "prepare": prepare,
    "codetune": run_codetune,
    "hf_trainer": run_hf_trainer,
    "trl_packing": run_trl_packing,
    "bare": run_bare,
}


def worker_main(name: str, settings_json: str, out: str) -> None:
    import torch

    s = Settings(**json.loads(settings_json))
    # The HF/TRL runners' load_dataset and map caches live and die with the benchmark's work folder.
    os.environ["HF_DATASETS_CACHE"] = os.path.join(s.workdir, "hf-datasets")
    torch.set_num_threads(s.threads)
    os.chdir(REPO)  # recipes resolve their data YAML relative to themselves; run paths relative to the repo
    result = WORKERS[name](s)
    result["torch_threads"] = torch.get_num_threads()
    Path(out).write_text(json.dumps(result))


# ---- the driver --------------------------------------------------------------------------------------------


def run_in_terminal(name: str, s: Settings, prefix: tuple[str, ...] = ()) -> dict:
    """Run one worker in a fresh process on a pseudo-terminal (progress bars draw as for a user at a shell);
    ``prefix`` wraps the command (a profiler)."""
    import fcntl
    import pty
    import struct
    import termios

    with tempfile.NamedTemporaryFile(suffix=".json", dir=s.workdir, delete=False) as f:
        out = f.name
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    cmd = [
        *prefix,
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--settings",
        json.dumps(asdict(s)),
    ]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "--out", out], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    tail = b""
    try:
        while True:  # drain the terminal (a full pty would block the child); keep the end for error messages
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            tail = (tail + chunk)[-8000:]
        code = proc.wait()
    finally:
        if proc.poll() is None:  # the driver was interrupted: do not leave a runner training on its own
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - start
    os.close(master)
    if code != 0:
        raise RuntimeError(f"{name} failed (exit {code}):\n{tail.decode(errors='replace')[-4000:]}")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return {**result, "wall_s": wall, "load_before": load}


def summarise(results: dict[str, list[dict]]) -> str:
    """Markdown tables: rates per runner, then codetune's ratios to the others per repetition."""
    lines = [
        "| runner | real tok/s, whole window: median (min - max) | real tok/s, median step: median (min - max) "
        "| s/step (median step) | run wall time s (median) |",
        "|---|---|---|---|---|",
    ]

    def spread(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}} - {max(values):{fmt}})"

    for name, runs in results.items():
        lines.append(
            f"| {name} | {spread([r['real_tok_s'] for r in runs], ',.0f')} | "
            f"{spread([r['median_real_tok_s'] for r in runs], ',.0f')} | "
            f"{statistics.median(r['median_step_s'] for r in runs):.3f} | "
            f"{statistics.median(r['wall_s'] for r in runs):.1f} |"
        )
    if "codetune" not in results:
        return "\n".join(lines)
    lines += [
        "",
        "| ratio | whole window: median (min - max) | median step: median (min - max) | target |",
        "|---|---|---|---|",
    ]
    targets = {"bare": ">= 0.9", "hf_trainer": ">= 1.3", "trl_packing": ">= 1.5"}
    for other in ("bare", "hf_trainer", "trl_packing"):
        if other not in results:
            continue
        # Ratios within a repetition: the runners ran back to back, so most of the machine's load cancels.
        pairs = list(zip(results["codetune"], results[other], strict=True))
        window = [a["real_tok_s"] / b["real_tok_s"] for a, b in pairs]
        median = [a["median_real_tok_s"] / b["median_real_tok_s"] for a, b in pairs]
        lines.append(
            f"| codetune / {other} | {spread(window, '.2f')} | {spread(median, '.2f')} | {targets[other]} |"
        )
    return "\n".join(lines)


# Where a step's time goes, by the first of these frames found in a main-thread stack (py-spy "raw" format).
PHASES = (  # Lightning runs forward, backward and clipping inside optimizer.step(closure): those come first
    ("backward", ("backward (torch/_tensor.py", "Accelerator.backward", "_engine_run_backward")),
    ("loss", ("cross_entropy", "loss_utils.py", "chunked_logprob")),
    ("model forward", ("modeling_llama.py",)),
    ("loss", ("token_losses",)),  # codetune's loss lines outside the model (slicing the logits)
    ("gradient clipping", ("clip_grad_norm_", "clip_gradients")),
    ("optimizer step", ("torch/optim/",)),
    ("data loading + collate", ("torch/utils/data/", "collat", "PackedBatches")),
    ("progress bar", ("rich", "tqdm", "progress")),
    ("codetune Throughput callback", ("callbacks.py",)),
    ("metric logging", ("logger_connector", "LightningModule.log ", "_maybe_log_save_evaluate", "csv_logs")),
)
TRAIN_LOOP_FRAMES = ("training_epoch_loop", "_inner_training_loop", "bare_loop")


def phase_shares(raw: str) -> tuple[dict[str, float], dict[str, float]]:
    """Fraction of the training loop's main-thread samples in each of :data:`PHASES`, and of the innermost
    frames of the samples that fall in none of them."""
    counts: dict[str, int] = {}
    other: dict[str, int] = {}
    for line in Path(raw).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "MainThread" not in stack.split(";")[0] or not any(f in stack for f in TRAIN_LOOP_FRAMES):
            continue
        phase = next((name for name, marks in PHASES if any(m in stack for m in marks)), "other")
        counts[phase] = counts.get(phase, 0) + int(n)
        if phase == "other":
            leaf = stack.rsplit(";", 1)[-1]
            other[leaf] = other.get(leaf, 0) + int(n)
    total = sum(counts.values()) or 1

    def shares(c: dict[str, int]) -> dict[str, float]:
        return {k: v / total for k, v in sorted(c.items(), key=lambda kv: -kv[1])}

    return shares(counts), shares(other)


def profile(name: str, s: Settings) -> None:
    """One run of ``name`` under py-spy (sampling, so the runner's own speed is barely changed)."""
    import shutil

    if shutil.which("py-spy") is None:
        raise SystemExit("--profile needs py-spy on PATH: pip install py-spy")
    raw = os.path.join(s.workdir, f"{name}.raw")
    r = run_in_terminal(
        name,
        s,
        ("py-spy", "record", "--nonblocking", "-r", "100", "--threads", "--format", "raw", "-o", raw, "--"),
    )
    print(
        f"{name} under py-spy: {r['median_real_tok_s']:,.0f} real tok/s (median step); main-thread samples:"
    )
    phases, other = phase_shares(raw)
    for phase, share in phases.items():
        print(f"  {phase:<30} {share:6.1%}")
    for frame, share in list(other.items())[:3]:
        print(f"    other: {share:6.1%} {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8, help="rows per optimizer step")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the rates")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in every runner (1: with other jobs on the cores, two threads stall at every "
        "OpenMP barrier whenever one is descheduled, and step times swing several-fold)",
    )
    parser.add_argument("--runners", nargs="*", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument(
        "--codetune_overrides",
        nargs="*",
        default=[],
        help="extra overrides for the codetune runner, e.g. --codetune_overrides=--trainer.enable_progress_bar=false",
    )
    parser.add_argument("--json", help="also write every run's numbers here")
    parser.add_argument(
        "--profile", nargs="*", choices=RUNNERS, help="instead: one run of each under py-spy, time per phase"
    )
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.settings, args.out)
        return
    # A terminated driver unwinds (runs its finally blocks), so it kills its runner and removes its work folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not 1 <= args.warmup < args.steps:
        raise SystemExit(f"--warmup ({args.warmup}) must be at least 1 and below --steps ({args.steps})")
    with tempfile.TemporaryDirectory(prefix="codetune-bench-") as workdir:
        s = Settings(
            recipe=str((REPO / args.recipe).resolve())
            if not Path(args.recipe).is_absolute()
            else args.recipe,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            steps=args.steps,
            warmup=args.warmup,
            threads=args.threads,
            workdir=workdir,
            codetune_overrides=args.codetune_overrides,
        )
        info = run_in_terminal("prepare", s)
        if args.profile is not None:
            for name in args.profile or RUNNERS:
                profile(name, s)
            return
        print(
            f"model: {info['model']}; {info['parameters']:,} parameters\n"
            f"data: {info['documents']} training documents; codetune packs them into {info['packed_rows']} rows "
            f"of {s.seq_len} (real fraction {info['packed_real_fraction']:.4f})\n"
            f"work per run: {s.steps} optimizer steps of {s.batch_size} x {s.seq_len} token slots, "
            f"{s.warmup} warm-up steps left out; torch threads {s.threads}; {args.repeats} repetitions, "
            f"interleaved; load average at start {os.getloadavg()}",
            flush=True,
        )
        results: dict[str, list[dict]] = {name: [] for name in args.runners}
        for rep in range(args.repeats):
            # a b c d, d c b a, ...: a load that rises or falls during the benchmark favours no runner.
            for name in args.runners if rep % 2 == 0 else args.runners[::-1]:
                r = run_in_terminal(name, s)
                results[name].append(r)
                print(
                    f"rep {rep} {name:<12} real tok/s {r['real_tok_s']:>7,.0f} (median step "
                    f"{r['median_real_tok_s']:>7,.0f})  steady {r['steady_s']:5.1f} s / {r['steady_steps']} steps  "
                    f"wall {r['wall_s']:5.1f} s  load {r['load_before']:.1f}  final loss {r['final_loss']:.4f}",
                    flush=True,
                )
        print()
        print(summarise(results))
        print(f"\nload average at end {os.getloadavg()}")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"settings": asdict(s), "info": info, "runs": results}, indent=1)
            )


if __name__ == "__main__":
    main()
