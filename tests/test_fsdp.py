"""FSDP2 on CPU over gloo: parameters really are sharded per rank, two processes train like one process with the
same global batch, and QLoRA (4-bit base stored as bf16, LoRA in fp32) trains sharded.

The 2-process runs are this file run as a script (``python tests/test_fsdp.py ...``); Lightning starts the
second rank by re-running the same command line. They run in their own process group under a hard timeout, so
a hung collective can never hang the suite. :func:`tiny_run` is also used in-process for 1-process references
and by ``test_resume.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SEQ = 32
VOCAB = 128
GLOBAL_BATCH = 8
ROWS = 64  # 8 global batches per epoch
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "vocab_size": VOCAB,
}


# ---- the tiny run (in-process, or as a script for several processes) -----------------------------------------
def rows() -> list[dict[str, torch.Tensor]]:
    """Rows with something to learn: each is a run of consecutive ids mod 16 from a random start."""
    starts = torch.randint(0, 16, (ROWS,), generator=torch.Generator().manual_seed(0))
    out = []
    for start in starts.tolist():
        ids = (start + torch.arange(SEQ)) % 16 + 3
        out.append({"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(SEQ)})
    return out


def tiny_run(
    root: str | Path,
    devices: int = 1,
    steps: int = 6,
    qlora_base: str | None = None,
    dropout: float = 0.0,
    precision: str = "32-true",
    every_n_steps: int = 2,
    rng_state: bool = True,
    kill_at_step: int | None = None,
    kill_in_save: int | None = None,
    ckpt_path: str | None = None,
    validate_first: bool = False,
) -> dict:
    """Train the tiny Llama for ``steps`` global batches of :data:`GLOBAL_BATCH` rows; returns what the tests check.

    Each rank reads every ``devices``-th row of each global batch (a fixed, resumable loader), so any number of
    processes sees the same global batches in the same order. ``qlora_base``: a saved tiny Llama loaded as a
    4-bit NF4 base stored in bf16 with LoRA adapters. ``kill_at_step`` / ``kill_in_save`` end the process
    with SIGKILL after that optimizer step / inside that save (numbered from 1). ``validate_first``: validate
    before fitting, as ``codetune fit`` does.
    """
    import lightning as L
    from torch.utils.data import DataLoader, DistributedSampler

    from codetune.model.adapters import Adapter, Quantization
    from codetune.model.build import ModelSpec
    from codetune.modules.causal import CausalLM
    from codetune.resume import AtomicCheckpoint, RNGState
    from codetune.strategies import FSDP2Strategy

    data = rows()

    class ResumableLoader(DataLoader):
        """Skips the batches a checkpoint says were consumed (what Lightning saves of a stateful loader)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.consumed, self._skip = 0, 0

        def __iter__(self):
            skip, self._skip = self._skip, 0
            for i, batch in enumerate(super().__iter__()):
                if i >= skip:
                    self.consumed = i + 1
                    yield batch

        def state_dict(self):
            return {"consumed": self.consumed}

        def load_state_dict(self, state):
            self._skip = state["consumed"]

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            t = self.trainer
            sampler = DistributedSampler(data, num_replicas=t.world_size, rank=t.global_rank, shuffle=False)
            # Its own generator: the loader then draws nothing from the global RNG (see codetune.resume).
            return ResumableLoader(
                data, batch_size=GLOBAL_BATCH // t.world_size, sampler=sampler, generator=torch.Generator()
            )

        def val_dataloader(self):
            return DataLoader(data[:4], batch_size=2)

    class Record(L.Callback):
        def __init__(self):
            self.losses, self.saves, self.grad_norms = [], 0, []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            squares = sum((g.float() ** 2).sum() for g in local)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(squares)
            self.grad_norms.append(float(squares) ** 0.5)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"].detach().clone()
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(loss)
                loss /= trainer.world_size
            self.losses.append(loss.item())
            if trainer.global_step == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            self.saves += 1
            if self.saves == kill_in_save:
                _die_while_writing()

    spec = ModelSpec(config=dict(TINY, attention_dropout=dropout))
    if qlora_base:
        # From a saved base, as a real QLoRA run loads one: from_pretrained quantizes while loading.
        spec = ModelSpec(name_or_path=qlora_base)
        spec.adapter = Adapter(method="lora", r=8, alpha=16, dropout=0.0)
        spec.quantization = Quantization(quant_storage="bfloat16", compute_dtype="bfloat16")
    L.seed_everything(0)
    # A QLoRA run carries a tokenizer (of the model's 128 ids), so its checkpoint exports like a real run's.
    module = CausalLM(
        model=spec,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        tokenizer=_word_tokenizer() if qlora_base else None,
    )
    record = Record()
    callbacks = [record, AtomicCheckpoint(save_last=True, every_n_train_steps=every_n_steps, save_top_k=0)]
    if rng_state:
        callbacks.append(RNGState())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=FSDP2Strategy() if devices > 1 else "auto",
        precision=precision,
        max_steps=steps,
        val_check_interval=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        logger=L.pytorch.loggers.CSVLogger(str(root)),
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    if validate_first:
        trainer.validate(module, datamodule=Data(), verbose=False)
    trainer.fit(module, datamodule=Data(), ckpt_path=ckpt_path)
    return _report(trainer, module, record)


def _word_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t2", pad_token="t0"
    )


def _die_while_writing() -> None:
    """Arm the next checkpoint write to stop half-way with SIGKILL, as a power cut or OOM kill would."""
    import lightning.fabric.plugins.io.torch_io as torch_io
    import lightning.pytorch.strategies.model_parallel as model_parallel

    def torn_file(checkpoint, filepath):  # single-file checkpoint: half its bytes reach the disk
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(filepath, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    original = model_parallel._distributed_checkpoint_save

    def torn_folder(state, path):  # sharded checkpoint: the shards are written, the metadata file never is
        original(state, path)
        if torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    torch_io._atomic_save = torn_file
    model_parallel._distributed_checkpoint_save = torn_folder


def _report(trainer, module, record) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = dict(module.named_parameters())
    local = {n: list(p.to_local().shape) for n, p in params.items() if isinstance(p, DTensor)}
    # what this rank holds: how it was built, and per 4-bit layer its weight's bytes and quantization state
    names = {id(p): n for n, p in params.items()}
    four_bit = {
        names[id(m.weight)]: {
            "weights": m.in_features * m.out_features,
            "local_bytes": m.weight.to_local().nbytes if isinstance(m.weight, DTensor) else m.weight.nbytes,
            "quant_state": getattr(m, "quant_state", None) is not None,
        }
        for m in module.modules()
        if type(m).__name__ == "Linear4bit"
    }
    mine = {"built_on_meta": getattr(module, "_build_on_meta", False), "four_bit": four_bit}
    shards, ranks = [None] * trainer.world_size, [None] * trainer.world_size
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(shards, local)
        torch.distributed.all_gather_object(ranks, mine)
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        shards, ranks, state = [local], [mine], module.state_dict()
    return {
        "ranks": ranks,
        "grad_norms": record.grad_norms,
        "losses": record.losses,
        "global_step": trainer.global_step,
        "full_shapes": {n: list(p.shape) for n, p in params.items()},
        "local_shapes": shards,
        "dtypes": {n: str(p.dtype) for n, p in params.items()},
        "trainable": [n for n, p in params.items() if p.requires_grad],
        "fsdp_modules": [n for n, m in module.named_modules() if isinstance(m, FSDPModule)],
        "state": {k: v.detach().float().clone() for k, v in state.items()},
    }


def run_processes(
    tmp_path: Path, timeout: float = 240, **options
) -> tuple[subprocess.CompletedProcess, dict | None]:
    """:func:`tiny_run` in fresh processes (this file as a script); returns the process and rank 0's report."""
    out = tmp_path / "report.pt"
    args = [sys.executable, str(Path(__file__).resolve()), "--out", str(out)]
    for key, value in options.items():
        args += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # rank 1 joins this process group: one kill ends every rank
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"distributed run did not finish in {timeout} s:\n{output[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a rank left behind by a killed rank 0
        except ProcessLookupError:
            pass
    done = subprocess.CompletedProcess(args, proc.returncode, output, "")
    return done, (torch.load(out, weights_only=False) if out.exists() else None)


def evaluate_as_on_nccl() -> None:
    """Make Lightning choose the evaluation context it chooses on GPUs. It evaluates under
    ``torch.inference_mode`` unless the process group is gloo (``loops/utilities.py``, ``_no_grad_context``), so a
    CPU run never meets what inference mode does to FSDP2 on NCCL; here gloo reports itself as NCCL to that
    choice only."""
    import types

    import lightning.pytorch.loops.utilities as utilities
    import torch.distributed as dist

    class AsOnNccl(types.ModuleType):
        def __getattr__(self, name):
            return getattr(dist, name)

        @staticmethod
        def get_backend(*args, **kwargs):
            return "nccl"

    utilities.dist = AsOnNccl("torch.distributed")


def _cli_main() -> None:
    """``python tests/test_fsdp.py fit ...``: ``codetune fit ...`` with Lightning's GPU evaluation context (:func:`evaluate_as_on_nccl`); Lightning starts
    rank 1 by running this same command line."""
    from codetune.cli import main

    evaluate_as_on_nccl()
    main(sys.argv[1:])


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", default=".")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--qlora_base")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--every_n_steps", type=int, default=2)
    parser.add_argument("--kill_at_step", type=int)
    parser.add_argument("--kill_in_save", type=int)
    parser.add_argument("--ckpt_path")
    parser.add_argument("--validate_first", action="store_true")
    parser.add_argument("--nccl_eval", action="store_true")
    options = vars(parser.parse_args())
    out = options.pop("out")
    if options.pop("nccl_eval"):
        evaluate_as_on_nccl()
    report = tiny_run(**options)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save(report, out)


# ---- tests -----------------------------------------------------------------------------------------------------
def test_decoder_layers_are_found_in_each_family_and_through_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from codetune.model.sharding import decoder_layers

    shape = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=64)
    for family, extra in [("llama", {}), ("starcoder2", {}), ("qwen2", {}), ("gpt_bigcode", {"n_layer": 3})]:
        config = AutoConfig.for_model(family, num_hidden_layers=3, **shape, **extra)
        model = AutoModelForCausalLM.from_config(config)
        layers = decoder_layers(model)
        assert len(layers) == 3, family
        assert len({type(layer) for layer in layers}) == 1
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"]))
    assert [type(x) for x in decoder_layers(lora)] == [type(x) for x in layers]


def test_mixed_precision_policy_follows_the_trainer_precision():
    from codetune.model.sharding import mixed_precision_policy

    policy = mixed_precision_policy("bf16-mixed")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision_policy("32-true") is None and mixed_precision_policy("bf16-true") is None
    with pytest.raises(ValueError, match="16-mixed.*bf16-mixed"):
        mixed_precision_policy("16-mixed")


def test_sharding_refuses_4bit_weights_not_stored_as_bf16():
    from codetune.model.adapters import Adapter, Quantization
    from codetune.model.build import ModelSpec, load_model
    from codetune.model.sharding import check_quantized_storage

    spec = ModelSpec(config=dict(TINY), adapter=Adapter(method="lora", r=4), quantization=Quantization())
    with pytest.raises(ValueError, match="quant_storage: bfloat16"):
        check_quantized_storage(load_model(spec))  # the default storage, uint8
    spec.quantization = Quantization(quant_storage="bfloat16")
    check_quantized_storage(load_model(spec))


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A one-process gloo group and its mesh, so sharding can be inspected in this process."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        torch.distributed.destroy_process_group()


def test_shard_model_wraps_each_layer_then_the_root_once(one_rank_mesh):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoConfig, AutoModelForCausalLM

    from codetune.model.sharding import shard_model

    model = get_peft_model(
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY)),
        LoraConfig(r=2, target_modules=["q_proj"]),
    )
    names = [name for name, _ in model.named_parameters()]
    assert shard_model(model, one_rank_mesh, compile=True) is model
    assert shard_model(model, one_rank_mesh) is model  # a second configure_model leaves it as it is
    wrapped = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    assert wrapped == ["", "base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    assert all(m._compiled_call_impl is not None for m in model.base_model.model.model.layers)
    assert [name for name, _ in model.named_parameters()] == names  # checkpoint keys unchanged


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_shards_every_parameter_and_two_processes_match_one(tmp_path):
    """Also: the ranks but rank 0 build the model on the meta device and receive their shards; validating before
    the fit under Lightning's GPU evaluation context (inference mode) leaves training intact."""
    one = tiny_run(tmp_path / "one", devices=1, steps=6, validate_first=True)
    proc, two = run_processes(
        tmp_path, devices=2, steps=6, root=tmp_path / "two", validate_first=True, nccl_eval=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [rank["built_on_meta"] for rank in two["ranks"]] == [False, True]

    # fully_shard was applied per decoder layer and at the root, and every parameter is a shard
    assert sorted(two["fsdp_modules"]) == ["model", "model.model.layers.0", "model.model.layers.1"]
    assert set(two["local_shapes"][0]) == set(two["full_shapes"])
    for name, full in two["full_shapes"].items():
        rank0, rank1 = (shards[name] for shards in two["local_shapes"])
        assert rank0[0] + rank1[0] == full[0] and rank0[1:] == rank1[1:] == full[1:], name
        assert abs(rank0[0] - full[0] / 2) <= 1, name  # about half each

    # same global batches, same losses and weights (up to float reordering in the reduce-scatter)
    assert len(two["losses"]) == len(one["losses"]) == 6
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][-1] < one["losses"][0]
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=0, atol=1e-4, msg=key)

    # the sharded checkpoint (one file per rank) consolidates to exactly the weights the ranks hold together;
    # codetune.checkpoints reads sharded folders with this same Lightning function
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder = tmp_path / "two" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in folder.iterdir()}
    consolidated = _load_distributed_checkpoint(folder)
    assert consolidated["global_step"] == 6
    differ = [k for k, v in two["state"].items() if not torch.equal(consolidated["state_dict"][k], v)]
    assert not differ


@pytest.mark.slow
@pytest.mark.distributed
def test_qlora_trains_sharded_over_two_processes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY)).save_pretrained(base)
    proc, report = run_processes(
        tmp_path, devices=2, steps=12, qlora_base=base, every_n_steps=12, root=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    full, shards = report["full_shapes"], report["local_shapes"]
    packed = [n for n, dtype in report["dtypes"].items() if "base_layer" in n and dtype == "torch.bfloat16"]
    assert len(packed) == 2 * 7  # every projection of both layers is 4-bit, packed in bf16 storage
    for name in packed:  # the packed 4-bit weights themselves are split between the ranks
        assert shards[0][name][0] + shards[1][name][0] == full[name][0] and shards[0][name][0] < full[name][0]
    # After sharding and training the base is still 4-bit (no rank unsharded it into full-size tensors: axolotl
    # #2992): every layer keeps its quantization state, and each rank holds about half of the 4-bit bytes.
    for rank in report["ranks"]:
        assert sorted(rank["four_bit"]) == sorted(packed) and all(
            v["quant_state"] for v in rank["four_bit"].values()
        )
    four_bit_bytes = sum(v["weights"] for v in report["ranks"][0]["four_bit"].values()) // 2
    held = [sum(v["local_bytes"] for v in rank["four_bit"].values()) for rank in report["ranks"]]
    assert sum(held) == four_bit_bytes and all(
        abs(h - four_bit_bytes / 2) <= 0.05 * four_bit_bytes for h in held
    )
    assert report["trainable"] and all("lora_" in n for n in report["trainable"])
    assert all(report["dtypes"][n] == "torch.float32" for n in report["trainable"])
    losses, norms = report["losses"], report["grad_norms"]
    assert len(losses) == len(norms) == 12
    assert all(math.isfinite(x) and x > 0.1 for x in losses + norms), (losses, norms)  # not accelerate #3983
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses

    # The sharded checkpoint is a QLoRA checkpoint (4-bit state saved beside the packed weights), so codetune
    # rebuilds, exports and evaluates it: the rebuilt adapter is the one trained.
    from codetune.checkpoints.format import checkpoint_shapes
    from codetune.checkpoints.trained import load_trained
    from codetune.model.build import ModelSpec, load_model

    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    shapes = checkpoint_shapes(folder)
    unsharded = load_model(
        ModelSpec(name_or_path=str(base), adapter={"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
                  quantization={"quant_storage": "bfloat16", "compute_dtype": "bfloat16"})
    )  # fmt: skip
    state_keys = {k for k in unsharded.state_dict() if ".weight." in k}
    assert {k.removeprefix("model.") for k in shapes if ".weight." in k} == state_keys and len(
        state_keys
    ) == 70
    from codetune.checkpoints.format import read_checkpoint
    from codetune.checkpoints.trained import rebuild_model

    adapter = rebuild_model(read_checkpoint(folder), merge=False)
    lora = {f"model.{k}": v for k, v in adapter.state_dict().items() if "lora_" in k}
    assert lora and set(lora) == {k for k in report["state"] if "lora_" in k}
    for key, value in lora.items():
        torch.testing.assert_close(value, report["state"][key], msg=key)
    merged, _ = load_trained(folder)
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=torch.arange(3, 19)[None]).logits).all()


QUICKSTART = [
    "--config",
    str(REPO / "recipes" / "quickstart.yaml"),
    '--data.init_args.sources=[{path: "@stdlib", name: stdlib, include: ["json/*.py"], max_files: 10}]',
    "--data.init_args.tokenizer.train.max_files=60",
    "--data.init_args.tokenizer.train.vocab_size=1024",
]


def test_fsdp_asked_with_one_device_runs_unsharded_with_a_warning(tmp_path, caplog):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from codetune.commands.fit import CodetuneCLI

    args = [
        *QUICKSTART,
        "--trainer.strategy=fsdp2",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = CodetuneCLI(args=args, run=False)
    assert isinstance(cli.trainer.strategy, SingleDeviceStrategy)
    assert "single device: running unsharded" in caplog.text


def test_fsdp_strategy_shards_over_every_process(tmp_path):
    from codetune.commands.fit import CodetuneCLI
    from codetune.strategies import FSDP2Strategy

    cli = CodetuneCLI(
        args=[
            *QUICKSTART,
            "--trainer.strategy=fsdp2",
            "--trainer.devices=2",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, FSDP2Strategy) and cli.trainer.num_devices == 2


@pytest.mark.parametrize(
    ("options", "gpus", "message"),
    [
        (["--trainer.devices=4096"], 0, "trainer.devices=4096 but this machine has"),
        # GPUs named by index: CUDA_VISIBLE_DEVICES=4,5 leaves GPUs 0 and 1
        (["--trainer.accelerator=gpu", "--trainer.devices=[0, 5]"], 2, "names GPU 5, but 2 visible CUDA GPU"),
        (
            ["--trainer.precision=bf16-true"],
            0,
            "bf16-true trains bf16 weights.*use trainer.precision: bf16-mixed",
        ),
        (
            [
                "--trainer.strategy=fsdp2",
                "--trainer.devices=2",
                "--model.init_args.optimizer=codetune.optim.PagedAdamW8bit",
            ],
            0,
            "PagedAdamW8bit \\(bitsandbytes\\) cannot step FSDP2's sharded parameters.*codetune.optim.AdamW",
        ),
        (
            [
                "--trainer.strategy=fsdp2",
                "--trainer.devices=2",
                "--model.init_args.model.adapter.method=lora",
                "--model.init_args.model.quantization={bits: 4}",
            ],
            0,
            "quant_storage=uint8 cannot be sharded with FSDP2.*set model.quantization.quant_storage: bfloat16",
        ),
    ],
)
def test_what_fails_only_on_gpus_or_at_the_first_step_is_a_one_line_error_up_front(
    tmp_path, monkeypatch, options, gpus, message
):
    """Each refused before the data module or the model is built (no tokenizer is trained: it would take
    seconds), in one line naming the setting and the fix."""
    from codetune.cli import main
    from codetune.data import datamodule

    if gpus:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(datamodule, "build_tokenizer", _built_too_early)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *QUICKSTART, *options, f"--trainer.default_root_dir={tmp_path}"])
    text = str(exit_.value)
    assert re.search(message, text) and "\n" not in text, text


def _built_too_early(*args, **kwargs):
    raise AssertionError("the data module was built before the recipe was refused")


def test_bitsandbytes_optimizers_are_refused_under_fsdp2_and_offload_keeps_shards_on_the_cpu():
    from codetune.optim import AdamW, PagedAdamW8bit
    from codetune.strategies import FSDP2Strategy, check_fsdp_optimizer

    with pytest.raises(ValueError, match="got mixed torch.Tensor and DTensor"):
        check_fsdp_optimizer(PagedAdamW8bit)
    check_fsdp_optimizer(AdamW)
    # Lightning moves the sharded module to the root device after configure_model; a GPU is played by "meta"
    for offload, device in ((False, "meta"), (True, "cpu")):
        strategy = FSDP2Strategy(cpu_offload=offload)
        strategy.parallel_devices = [torch.device("meta")]
        strategy.model = torch.nn.Linear(2, 2)
        strategy.model_to_device()
        assert strategy.model.weight.device.type == device


def test_each_rank_takes_its_share_of_the_cores():
    from codetune.strategies import threads_per_rank

    cores = len(os.sched_getaffinity(0))
    # Lightning or torchrun start the ranks of a node on one set of cores
    assert threads_per_rank(2, environ={}) == max(1, cores // 2)
    # srun --cpus-per-task gives each task its own cores: they are not divided again by the node's 8 tasks
    slurm = {"SLURM_PROCID": "3", "SLURM_CPUS_PER_TASK": str(cores)}
    assert threads_per_rank(8, environ=slurm) == cores
    assert threads_per_rank(8, environ={**slurm, "SLURM_CPUS_PER_TASK": "1"}) == 1


def _recipe_on_cpu(recipe: str, tmp_path: Path) -> list[str]:
    """A shipped multi-GPU recipe, kept whole but for a tiny Llama, a small tokenizer and data, 2 CPU processes."""
    tiny = {k: v for k, v in TINY.items() if k != "vocab_size"}
    return [
        "--config",
        str(REPO / "recipes" / recipe),
        "--model.init_args.model.name_or_path=null",
        f"--model.init_args.model.config={json.dumps(tiny)}",
        "--data.init_args.tokenizer={train: {corpus: '@stdlib', vocab_size: 1024, max_files: 60}, name_or_path: null}",
        '--data.init_args.sources=[{path: "@stdlib", name: stdlib, include: ["json/*.py"], max_files: 10}]',
        "--data.init_args.seq_len=64",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.num_nodes=1",
        f"--trainer.default_root_dir={tmp_path}",
    ]


def test_scale_out_recipes_configure_fsdp2_and_atomic_checkpoints(tmp_path):
    from codetune.commands.fit import CodetuneCLI
    from codetune.resume import AtomicCheckpoint
    from codetune.strategies import FSDP2Strategy

    for recipe, every in (("fsdp-multigpu.yaml", 250), ("multinode-slurm.yaml", 100)):
        cli = CodetuneCLI(args=[*_recipe_on_cpu(recipe, tmp_path), "--trainer.plugins=null"], run=False)
        assert isinstance(cli.trainer.strategy, FSDP2Strategy) and cli.trainer.strategy.reshard_after_forward
        checkpoints = cli.trainer.checkpoint_callbacks
        assert len(checkpoints) == 1 and isinstance(checkpoints[0], AtomicCheckpoint), recipe
        assert checkpoints[0]._every_n_train_steps == every and checkpoints[0].save_last


@pytest.mark.slow
@pytest.mark.distributed
def test_codetune_fit_runs_the_fsdp_recipe_on_two_cpu_processes(tmp_path):
    """With the validation before the fit, under the evaluation context Lightning takes on GPUs (inference mode:
    it broke the first training step after it, "Inplace update to inference tensor outside InferenceMode")."""
    args = [
        *_recipe_on_cpu("fsdp-multigpu.yaml", tmp_path),
        "--trainer.max_steps=2",
        "--trainer.accumulate_grad_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=2",
        "--data.init_args.split.val_fraction=0.3",  # of 10 files: some to validate on
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "fit", *args],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, output[-3000:]
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert "codetune fit: summary" in output
    assert re.search(r"val loss before\W+\d", output), output[-2000:]


if __name__ == "__main__":
    _cli_main() if sys.argv[1:2] == ["fit"] else _main()
