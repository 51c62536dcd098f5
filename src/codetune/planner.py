"""How much accelerator memory a training step of a recipe needs, per device, before anything is loaded.

The model is built on the meta device from its config (no weights), so every parameter is counted exactly by
the architecture transformers would build; the rest is arithmetic over that inventory:

- **parameters** by storage: the load dtype, 4-bit NF4/FP4 blocks (half a byte per weight) plus their scales as
  bitsandbytes stores them (an fp32 absmax per 64 weights, or with double quantization a byte per 64 plus an fp32
  per 256 blocks), 8-bit rows with an fp32 scale each; under quantization every other weight is float32, as
  peft's ``prepare_model_for_kbit_training`` leaves it; LoRA/DoRA matrices in float32;
- **gradients** of the trainable parameters, in their dtype;
- **optimizer states**: AdamW two moments in the parameter's dtype, Lion one, 8-bit (paged) AdamW two bytes;
- **activations** kept for the backward pass, per decoder layer and token (with activation checkpointing:
  each layer's input, plus one layer recomputed), for the recipe's ``seq_len`` x micro-batch;
- **the loss**: the chunked output layer's buffers (``loss_chunk_tokens``), or the full logits path's;
- **FSDP2**: weights, gradients and states divided by the ranks, plus what is whole on every rank — the root's
  parameters (embeddings, head, final norm) and two decoder layers gathered at once (one running, one
  prefetched).

The activation coefficients are counted from what autograd saves in a Llama-style block with flash/SDPA
attention (no T x T scores); ``docs/performance.md`` ("Planning memory") compares the planned peak with the
measured one on CPU. Fixed overheads the planner does not know (CUDA context ~0.5 GB, allocator fragmentation)
are left to :data:`HEADROOM`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from codetune.checkpoints.trained import trained_base_config
from codetune.model.adapters import FAMILY_TARGETS
from codetune.model.build import ModelSpec
from codetune.modules.loss import DEFAULT_CHUNK_TOKENS

GiB = 2**30
GPUS_GB = (24, 40, 48, 80, 141)
"""The common accelerator sizes a plan gives a verdict for (RTX 4090 / A10G / L4, A100-40, L40S / A6000,
A100-80 / H100, H200)."""
HEADROOM = 0.9
"""A plan fits a device when its peak is at most this share of the device's memory (CUDA context, cuBLAS
workspaces and allocator fragmentation take the rest)."""

# Key numbers of the Hub models codetune's recipes name, from their config.json files, so `codetune plan` works
# without a network. A cached config (HF_HUB_OFFLINE) or --model_config wins over these.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "codellama/CodeLlama-7b-hf": dict(
        model_type="llama",
        vocab_size=32016,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=16384,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-Coder-7B": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "bigcode/starcoder2-3b": dict(
        model_type="starcoder2",
        vocab_size=49152,
        hidden_size=3072,
        intermediate_size=12288,
        num_hidden_layers=30,
        num_attention_heads=24,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        use_bias=True,
        tie_word_embeddings=True,
    ),
}

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class NoModelConfig(ValueError):
    """The planner has no config for the recipe's model here (pass one with ``--model_config``)."""


@dataclass
class Setup:
    """What a plan needs to know about a run besides the model (a recipe's trainer, data and optimizer keys)."""

    seq_len: int = 2048
    batch_size: int = 1
    """Rows per device per micro-batch."""
    precision: str = "32-true"
    devices: int = 1
    """Processes the model is sharded over (FSDP2), or 1."""
    fsdp: bool = False
    optimizer: str = "torch.optim.AdamW"
    """Class path of the optimizer."""
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    vocab_size: int | None = None
    """The run tokenizer's size when it grows the base's vocabulary (else the config's)."""


@dataclass
class Plan:
    """Bytes per device of one training step, by part, and the peak."""

    model: str
    parameters: int
    trainable: int
    weights: dict[str, int] = field(default_factory=dict)
    """Weight bytes by storage (``bfloat16``, ``nf4 blocks + scales``, ``lora float32``, ...), whole model."""
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    activations_without_checkpointing: int = 0
    activations_with_checkpointing: int = 0
    loss: int = 0
    loss_full_logits: int = 0
    """The loss path's peak if the full logits were formed (``loss_chunk_tokens: 0``), for comparison."""
    autocast_copies: int = 0
    """bf16 copies of float32 weights that autocast keeps for the backward pass (mixed precision, unsharded)."""
    sharded_over: int = 1
    unsharded: int = 0
    """FSDP2: bytes whole on every rank (root parameters, two gathered decoder layers)."""
    largest_layer: int = 0
    """Bytes of the largest decoder layer as gathered (FSDP2) or stored."""
    peak: int = 0
    notes: list[str] = field(default_factory=list)

    def fits(self, gb: float) -> bool:
        return self.peak <= HEADROOM * gb * 1e9

    def verdicts(self) -> dict[str, bool]:
        return {f"{gb} GB": self.fits(gb) for gb in GPUS_GB}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_gib": round(self.peak / GiB, 2), "verdicts": self.verdicts()}

    def table(self) -> str:
        """The plan as the lines ``codetune plan`` prints."""
        gib = lambda b: f"{b / GiB:,.2f} GiB"  # noqa: E731
        weights = sum(self.weights.values())
        lines = [
            f"model: {self.model} — {self.parameters / 1e9:.3f} B parameters, {self.trainable / 1e6:,.1f} M trainable",
            f"per device (sharded over {self.sharded_over})" if self.sharded_over > 1 else "one device",
            f"  weights            {gib(weights / self.sharded_over)}"
            + "".join(f"\n    {k:<24}{gib(v / self.sharded_over)}" for k, v in self.weights.items()),
            f"  gradients          {gib(self.gradients / self.sharded_over)}",
            f"  optimizer states   {gib(self.optimizer_states / self.sharded_over)}",
        ]
        if self.sharded_over > 1:
            lines.append(
                f"  unsharded (FSDP2)  {gib(self.unsharded)}  (root parameters + 2 gathered layers of "
                f"{gib(self.largest_layer)})"
            )
        if self.autocast_copies:
            lines.append(f"  autocast copies    {gib(self.autocast_copies)}")
        lines += [
            f"  activations        {gib(self.activations)}  (with checkpointing "
            f"{gib(self.activations_with_checkpointing)}, without {gib(self.activations_without_checkpointing)})",
            f"  loss buffers       {gib(self.loss)}  (full logits would take {gib(self.loss_full_logits)})",
            f"  peak               {gib(self.peak)}",
            f"fits (peak <= {HEADROOM:.0%} of the device): "
            + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in self.verdicts().items()),
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def model_config(spec: ModelSpec, override: dict[str, Any] | None = None, tokenizer: Any = None):
    """The transformers config of ``spec`` without weights or network: ``override`` (``model_type`` + fields),
    ``spec.config``, a local folder or run, a cached Hub config, or :data:`KNOWN_CONFIGS`."""
    from transformers import AutoConfig

    values = dict(override) if override else None
    if values is None and spec.config is not None:
        values = dict(spec.config)
    if values is None and spec.name_or_path in KNOWN_CONFIGS:
        try:
            return AutoConfig.from_pretrained(spec.name_or_path, local_files_only=True)
        except (OSError, ValueError):
            values = dict(KNOWN_CONFIGS[spec.name_or_path])
    if values is None:
        try:
            return trained_base_config(spec, tokenizer)
        except OSError as error:
            raise NoModelConfig(
                f"plan: no config for model.name_or_path={spec.name_or_path} here ({error}); pass the "
                "architecture with --model_config '{model_type: llama, hidden_size: ..., ...}'"
            ) from None
    if "model_type" not in values:
        raise ValueError("plan: --model_config needs a model_type (e.g. llama, qwen2, starcoder2)")
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    return config


def meta_model(config):
    """The architecture with every parameter on the meta device: shapes and dtypes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _decoder_layers(model) -> torch.nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return max(lists, key=len)


def plan_memory(spec: ModelSpec, setup: Setup, config=None) -> Plan:
    """The memory plan of training ``spec`` under ``setup`` (``config``: the model's transformers config)."""
    config = config if config is not None else model_config(spec)
    if setup.vocab_size and setup.vocab_size > config.vocab_size:
        multiple = max(spec.pad_vocab_to_multiple_of, 1)
        config.vocab_size = -(-setup.vocab_size // multiple) * multiple
    model = meta_model(config)
    layers = _decoder_layers(model)
    n_layers = len(layers)
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "multi_query", False):
        kv = 1
    vocab = config.vocab_size
    gated = any(name.endswith(("gate_proj", "gate_up_proj", "w1")) for name, _ in model.named_modules())
    tied = bool(getattr(config, "tie_word_embeddings", False))

    quant = spec.quantization
    adapter = spec.adapter.method
    load_bytes = _BYTES[spec.dtype]
    other_bytes = 4 if quant is not None else load_bytes  # peft upcasts the unquantized weights to fp32
    layer_ids = {id(p) for p in layers.parameters()}
    family = FAMILY_TARGETS.get(config.model_type)

    weights: dict[str, int] = {}
    trainable = 0
    lora_params = 0
    block_linear_params = 0
    block_linears: list[tuple[str, torch.nn.Linear]] = []
    for name, module in layers[0].named_modules():
        if isinstance(module, torch.nn.Linear):
            block_linears.append((name, module))
    for name, module in block_linears:
        block_linear_params += module.weight.numel()
        targeted = family is None or name.rsplit(".", 1)[-1] in family
        if spec.adapter.target_modules not in ("auto", "all-linear"):
            targeted = name.rsplit(".", 1)[-1] in spec.adapter.target_modules
        if adapter != "full" and targeted:
            lora_params += spec.adapter.r * (module.in_features + module.out_features)
            if adapter == "dora":
                lora_params += module.out_features
    block_linear_params *= n_layers
    lora_params *= n_layers
    all_params = sum(p.numel() for p in model.parameters())
    rest_params = all_params - block_linear_params  # embeddings, head, norms, biases
    if quant is None:
        weights[spec.dtype] = all_params * load_bytes
    else:
        if quant.bits == 4:
            blocks = block_linear_params // 64
            scales = (blocks + blocks // 256 * 4 + 2 * 256 * 4) if quant.double_quant else blocks * 4
            weights[f"{quant.quant_type} blocks + scales"] = block_linear_params // 2 + scales
        else:
            rows = sum(m.out_features for _, m in block_linears) * n_layers
            weights["int8 rows + scales"] = block_linear_params + rows * 4
        weights["float32 (not quantized)"] = rest_params * 4
    if adapter != "full":
        weights[f"{adapter} float32"] = lora_params * 4
        trainable = lora_params
        grad_bytes = lora_params * 4
        state_param_bytes = 4
    else:
        trainable = all_params
        grad_bytes = all_params * load_bytes
        state_param_bytes = load_bytes

    # Optimizer states per trainable parameter.
    name = setup.optimizer.rsplit(".", 1)[-1].lower()
    if "8bit" in name:
        states = trainable * 2
        kind = "8-bit AdamW (paged: may spill to host memory, counted on the device here)"
    elif "lion" in name:
        states = trainable * state_param_bytes
        kind = "Lion"
    elif "sgd" in name:
        states = 0
        kind = "SGD"
    else:
        states = trainable * 2 * state_param_bytes
        kind = "AdamW"

    precision = str(setup.precision)
    mixed = precision.endswith("-mixed")
    compute = 2 if (precision.startswith(("bf16", "16")) or quant is not None) else 4
    if quant is not None:
        compute = _BYTES[quant.compute_dtype]
    sharded = setup.fsdp and setup.devices > 1
    # The residual stream's dtype: the weights' (fp32 under autocast with fp32 weights), the gathered dtype
    # under FSDP2's mixed precision.
    stream = 2 if (sharded and precision.startswith("bf16")) else (other_bytes if mixed or quant else compute)
    stream = min(stream, 4)
    tokens = setup.seq_len * setup.batch_size
    g = kv / heads
    norm = 4 * hidden + stream * hidden
    attention = compute * hidden * (5 + 2 * g)
    mlp = 4 * compute * inter if gated else 2 * compute * inter + compute * hidden
    per_layer_token = 2 * norm + attention + mlp
    final = norm * tokens
    without = n_layers * per_layer_token * tokens + final
    with_ckpt = n_layers * stream * hidden * tokens + per_layer_token * tokens + final
    activations = with_ckpt if spec.gradient_checkpointing else without

    # The loss: chunk x vocab logits (compute dtype), their fp32 softmax and logsumexp temporary, the gradient
    # in the compute dtype, plus the labelled hidden states and their gradient.
    chunk = min(setup.loss_chunk_tokens or tokens, tokens)
    loss_chunked = (
        chunk * vocab * (compute + 4 + 4 + (compute if compute != 4 else 0)) + 2 * tokens * hidden * 4
    )
    loss_full = tokens * vocab * (compute + 4 + 4 + 4)
    loss = loss_chunked if setup.loss_chunk_tokens else loss_full

    autocast = 0
    if mixed and not sharded and load_bytes == 4 and quant is None:
        # Autocast caches a bf16 copy of each fp32 weight a matmul reads, and the matmul keeps it for backward.
        autocast = (block_linear_params + (0 if tied else vocab * hidden)) * 2

    weight_bytes = sum(weights.values())
    layer_params = sum(p.numel() for p in layers[0].parameters())
    gathered_bytes = 2 if precision.startswith("bf16") else load_bytes
    if quant is not None:
        largest = (
            sum(v for k, v in weights.items() if "blocks" in k or "rows" in k) // n_layers
            + (lora_params // n_layers) * 4
        )
    else:
        largest = layer_params * (gathered_bytes if sharded else load_bytes)
    root_params = sum(p.numel() for p in model.parameters() if id(p) not in layer_ids)
    ranks = setup.devices if sharded else 1
    unsharded = 0
    if sharded:
        unsharded = root_params * (gathered_bytes if quant is None else other_bytes) + 2 * largest
    states_and_weights = (weight_bytes + states) / ranks + unsharded
    grads = grad_bytes / ranks
    # The peak: at the start of the backward pass every activation and the loss buffers are alive with the
    # head's gradient; late in the backward (or at the step) all gradients are, with little activation left.
    head_grad = (vocab * hidden * (load_bytes if adapter == "full" else 0)) / ranks
    early = activations + loss + head_grad + autocast
    late = grads + per_layer_token * tokens + (autocast if not spec.gradient_checkpointing else 0)
    peak = int(states_and_weights + max(early, late))
    notes = [f"optimizer: {kind}"]
    if not spec.gradient_checkpointing:
        notes.append(
            f"activation checkpointing (model.gradient_checkpointing: true) would take activations from "
            f"{without / GiB:,.2f} to {with_ckpt / GiB:,.2f} GiB"
        )
    notes.append(
        "attention: flash-attn 2 or SDPA without a T x T mask assumed (packed rows under SDPA add B x T^2 bytes)"
    )
    return Plan(
        model=spec.name_or_path or config.model_type,
        parameters=all_params + lora_params,
        trainable=trainable,
        weights=weights,
        gradients=grad_bytes,
        optimizer_states=states,
        activations=int(activations),
        activations_without_checkpointing=int(without),
        activations_with_checkpointing=int(with_ckpt),
        loss=int(loss),
        loss_full_logits=int(loss_full),
        autocast_copies=int(autocast),
        sharded_over=ranks,
        unsharded=int(unsharded),
        largest_layer=int(largest),
        peak=peak,
        notes=notes,
    )


_FSDP = ("fsdp2", "FSDP2Strategy", "ModelParallelStrategy")
AUTO_DEVICES = 8
"""``trainer.devices: auto`` on a machine without GPUs is planned as one node of this many."""


def recipe_plan(
    config: dict[str, Any],
    devices: int | None = None,
    model_override: dict[str, Any] | None = None,
    visible_gpus: int = 0,
) -> Plan:
    """The plan of a parsed recipe (``config``: the fit parser's namespace as a dict)."""
    model_args = dict(config["model"].get("init_args") or {})
    spec_values = model_args.get("model") or {}
    spec = ModelSpec(**spec_values) if isinstance(spec_values, dict) else spec_values
    optimizer = model_args.get("optimizer") or "torch.optim.AdamW"
    if isinstance(optimizer, dict):
        optimizer = optimizer.get("class_path", "torch.optim.AdamW")
    trainer = config.get("trainer") or {}
    strategy = trainer.get("strategy")
    name = strategy if isinstance(strategy, str) else (strategy or {}).get("class_path") or ""
    fsdp = str(name).endswith(_FSDP)
    wanted = trainer.get("devices", "auto")
    if devices is None:
        if isinstance(wanted, list):
            devices = len(wanted)
        elif str(wanted).lstrip("-").isdigit() and int(wanted) > 0:
            devices = int(wanted)
        else:
            devices = visible_gpus or AUTO_DEVICES
    devices *= int(trainer.get("num_nodes") or 1)
    data = dict((config.get("data") or {}).get("init_args") or {})
    tokenizer = data.get("tokenizer") or {}
    train = tokenizer.get("train") if isinstance(tokenizer, dict) else None
    vocab = None
    if spec.config is not None and "vocab_size" not in spec.config and train:
        vocab = int(train.get("vocab_size") or 0) + 5  # the trained vocabulary plus the FIM sentinels
    setup = Setup(
        seq_len=int(data.get("seq_len") or 2048),
        batch_size=int(data.get("batch_size") or 1),
        precision=str(trainer.get("precision") or "32-true"),
        devices=devices if fsdp else 1,
        fsdp=fsdp,
        optimizer=str(optimizer),
        loss_chunk_tokens=int(model_args.get("loss_chunk_tokens", DEFAULT_CHUNK_TOKENS)),
        vocab_size=vocab,
    )
    plan = plan_memory(spec, setup, model_config(spec, model_override))
    plan.notes.insert(
        0,
        f"seq_len {setup.seq_len} x {setup.batch_size} rows per device, precision {setup.precision}, "
        f"{'FSDP2 over ' + str(devices) + ' devices' if fsdp and devices > 1 else 'one device'}, "
        f"gradient checkpointing {'on' if spec.gradient_checkpointing else 'off'}",
    )
    return plan


def check_fits(config: dict[str, Any], device_bytes: int | None, devices: int) -> Plan | None:
    """Refuse a recipe whose planned peak exceeds the device (``device_bytes``; None: not a GPU run, no check)."""
    if not device_bytes:
        return None
    result = recipe_plan(config, None, None, devices)
    if result.peak > HEADROOM * device_bytes:
        raise ValueError(
            f"memory: `codetune plan` puts this recipe's training step at {result.peak / GiB:,.1f} GiB per device, "
            f"more than {HEADROOM:.0%} of this GPU's {device_bytes / GiB:,.1f} GiB; turn on "
            "model.gradient_checkpointing, lower data.seq_len / batch_size, use LoRA/QLoRA or more devices with "
            "FSDP2 (see `codetune plan --config RECIPE`), or skip this check with --memory_check false"
        )
    return result
