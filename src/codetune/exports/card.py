"""The model card (README.md) an export carries: what the model is, how it was trained, how to prompt it.

Everything in it is read from the checkpoint and the run directory (``config.yaml``, ``eval/*.json``); what
was not recorded is said to be unknown rather than guessed. The recipe is included with secrets stripped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from codetune.checkpoints.format import TrainedCheckpoint
from codetune.data.fim import format_infill_prompt, format_repository_infill_prompt
from codetune.data.repository import RepoTokens, repo_tokens
from codetune.data.tokenizer import FIMSentinels, fim_sentinels
from codetune.eval.report import scores_of
from codetune.exports.secrets import known_secrets, redact_text, strip_secrets
from codetune.model.build import ModelSpec

log = logging.getLogger(__name__)

STDLIB_PROVENANCE = (
    f"Python {sys.version_info.major}.{sys.version_info.minor} standard library sources (CPython), "
    "Python Software Foundation License 2.0"
)


@dataclass
class CardFacts:
    """What the card says, gathered before rendering so it can be tested without a model."""

    title: str
    model_type: str
    num_parameters: int
    """Parameters of the (merged) model; for an adapter-only export, of the base it applies to."""
    vocab_size: int
    """Rows of the embedding (the tokenizer's size padded to a multiple, when it grew)."""
    tokenizer_size: int
    export_dtype: str
    adaptation: str
    """How the weights were trained and exported, in one phrase."""
    base_model: str | None = None
    """``model.name_or_path`` (None: trained from a config, from scratch)."""
    adapter_only: bool = False
    adapter_parameters: int = 0
    """Trained adapter parameters (LoRA/DoRA weights, new token rows); 0 for full fine-tuning."""
    vocab_grew: bool = False
    """Training added embedding rows to the base (the FIM sentinels were new to it)."""
    max_position_embeddings: int | None = None
    rope_parameters: dict[str, Any] | None = None
    sentinels: FIMSentinels | None = None
    fim: dict[str, Any] | None = None
    """The recipe's FIM objective settings, when it has one."""
    repository_level: bool = False
    """The recipe trained on repository-level documents (a git source with ``repository_documents``)."""
    repo_tokens: RepoTokens | None = None
    """The repository and file tokens the tokenizer carries."""
    sources: list[dict[str, str]] = field(default_factory=list)
    """Training data: ``name``, ``kind``, ``location``, ``provenance``."""
    tokens_seen: int | None = None
    decontamination: dict[str, Any] | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    train_seconds: float | None = None
    global_step: int | None = None
    eval_results: list[dict[str, Any]] = field(default_factory=list)
    recipe: dict[str, Any] | None = None
    """The run's config.yaml, secrets stripped."""
    license: str | None = None


# ---- reading the run directory ------------------------------------------------------------------------


def read_recipe(run_dir: Path | None) -> dict[str, Any] | None:
    """The run's resolved recipe (``config.yaml`` that LightningCLI saved), or None when there is none."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    try:
        recipe = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        log.warning("%s/config.yaml is not valid YAML (%s); the card omits the recipe", run_dir, err)
        return None
    return recipe if isinstance(recipe, dict) else None


def read_eval_results(run_dir: Path | None) -> list[dict[str, Any]]:
    """Eval result files of the run (``eval/**/*.json``, as ``codetune eval`` writes them), oldest first."""
    if run_dir is None or not (run_dir / "eval").is_dir():
        return []
    results = []
    for path in sorted((run_dir / "eval").rglob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            log.warning("skipping eval file %s: %s", path, err)
            continue
        if isinstance(data, dict):
            results.append({"file": str(path.relative_to(run_dir)), **data})
    return results


def train_seconds(run_dir: Path | None, checkpoint: Path) -> float | None:
    """Wall-clock estimate from run start (``config.yaml`` is written when fit starts) to the checkpoint."""
    start = run_dir / "config.yaml" if run_dir is not None else None
    if start is None or not start.is_file() or not checkpoint.exists():
        return None
    seconds = checkpoint.stat().st_mtime - start.stat().st_mtime
    return seconds if seconds > 0 else None


def data_sources(recipe: dict[str, Any] | None) -> list[dict[str, str]]:
    """The training sources named in the recipe's data section, with what is known of their licences."""
    data = (recipe or {}).get("data")
    found: list[dict[str, str]] = []
    for kind, fields in _source_entries(data):
        location = str(fields.get("path"))
        found.append(
            {
                "name": str(fields.get("name") or kind),
                "kind": kind,
                "location": location,
                "provenance": _provenance(kind, location, fields),
            }
        )
    return found


def _source_entries(node: Any, kind: str | None = None):
    """(kind, fields) for every dict with a ``path`` in the data section; the tokenizer's corpus is not data."""
    if isinstance(node, dict):
        if "class_path" in node and isinstance(node.get("init_args"), dict):
            yield from _source_entries(node["init_args"], str(node["class_path"]).rsplit(".", 1)[-1])
            return
        if isinstance(node.get("path"), str):
            yield kind or "CodeFiles", node
            return
        for key, value in node.items():
            if key != "tokenizer":
                yield from _source_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _source_entries(item)


def _provenance(kind: str, location: str, fields: dict[str, Any]) -> str:
    if fields.get("license"):
        return f"licence given in the recipe: {fields['license']}"
    if location == "@stdlib":
        return STDLIB_PROVENANCE
    if kind == "HFDataset":
        return f"Hugging Face dataset `{location}`; see https://huggingface.co/datasets/{location} for its licence"
    return "local files; licence not recorded in the recipe"


def repository_level(recipe: dict[str, Any] | None) -> bool:
    """Whether the recipe's data has a git source joining files into repository documents (the default)."""
    return any(
        kind == "GitRepos" and fields.get("repository_documents", True) is not False
        for kind, fields in _source_entries((recipe or {}).get("data"))
    )


def find_key(node: Any, key: str) -> Any:
    """The first value stored under ``key`` anywhere in a nested recipe (depth first), else None."""
    if isinstance(node, dict):
        if key in node:
            return node[key]
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            value = find_key(item, key)
            if value is not None:
                return value
    return None


def fim_settings(recipe: dict[str, Any] | None) -> dict[str, Any] | None:
    """The FIM objective settings in the recipe's data section (a dict holding ``fim_rate``), if any."""

    def search(node: Any) -> dict[str, Any] | None:
        if isinstance(node, dict):
            if "fim_rate" in node:
                return node
            node = list(node.values())
        if isinstance(node, list):
            for item in node:
                if (hit := search(item)) is not None:
                    return hit
        return None

    return search((recipe or {}).get("data"))


def decontamination(recipe: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recipe's decontamination settings (codetune curation), or None when it records none."""
    flag = find_key((recipe or {}).get("data"), "decontaminate")
    if flag is None:
        return None
    data = recipe.get("data")
    return {
        "applied": bool(flag),
        "sets": find_key(data, "decontamination_sets"),
        "ngram": find_key(data, "decontamination_ngram"),
    }


def tokens_seen(recipe: dict[str, Any] | None, global_step: int | None) -> int | None:
    """Token positions trained on: steps × batch × seq_len × accumulation × devices × nodes (padding included)."""
    if not recipe or not global_step:
        return None
    trainer = recipe.get("trainer") or {}
    factors = [
        global_step,
        find_key(recipe.get("data"), "batch_size"),
        find_key(recipe.get("data"), "seq_len"),
        trainer.get("accumulate_grad_batches") or 1,
        trainer.get("devices"),
        trainer.get("num_nodes") or 1,
    ]
    if not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in factors):
        return None
    total = 1
    for f in factors:
        total *= f
    return total


def hardware(recipe: dict[str, Any] | None) -> dict[str, Any]:
    """The Trainer's device settings as recorded in the recipe (the exact GPU model is not recorded)."""
    trainer = (recipe or {}).get("trainer") or {}
    keys = ("accelerator", "devices", "num_nodes", "strategy", "precision")
    return {k: trainer[k] for k in keys if trainer.get(k) is not None}


# ---- rendering --------------------------------------------------------------------------------------------

_EXAMPLE_PREFIX = 'def remove_non_ascii(s: str) -> str:\n    """'
_EXAMPLE_SUFFIX = "\n    return result\n"


def render_card(facts: CardFacts, secrets: tuple[str, ...] = (), extra_sections: Sequence[str] = ()) -> str:
    """The README.md text: Hub metadata front matter, then the card; ``extra_sections`` (markdown, e.g. the GGUF
    export's "use it in your editor") go before the limitations. ``secrets`` are redacted wherever found."""
    meta: dict[str, Any] = {
        "library_name": "peft" if facts.adapter_only else "transformers",
        "license": facts.license or "other",
        "pipeline_tag": "text-generation",
        "tags": ["codetune", "code"] + (["fill-in-the-middle"] if facts.sentinels else []),
    }
    if facts.base_model and _looks_like_hub_id(facts.base_model):
        meta["base_model"] = facts.base_model
    hf_datasets = [s["location"] for s in facts.sources if s["kind"] == "HFDataset"]
    if hf_datasets:
        meta["datasets"] = hf_datasets
    parts = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    parts += [f"# {facts.title}", "", _summary(facts), ""]
    parts += _model_section(facts)
    parts += _usage_section(facts)
    parts += _fim_section(facts)
    parts += _data_section(facts)
    parts += _training_section(facts)
    parts += _eval_section(facts)
    parts += _recipe_section(facts)
    parts += [line for section in extra_sections for line in (section.rstrip(), "")]
    parts += [
        "## Limitations",
        "",
        "Generated code can be wrong, insecure or copied from training data; review and test it before use. "
        "The evaluation numbers above (if any) are the only measurements of this model's quality that codetune "
        "recorded.",
        "",
    ]
    return redact_text("\n".join(parts), secrets)


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not Path(name).expanduser().exists()


def _summary(facts: CardFacts) -> str:
    base = (
        f"`{facts.base_model}`" if facts.base_model else f"a freshly initialised `{facts.model_type}` config"
    )
    return f"A code language model trained with codetune from {base}: {facts.adaptation}."


def _model_section(facts: CardFacts) -> list[str]:
    rows = [
        ("Base model", f"`{facts.base_model}`" if facts.base_model else "none (trained from a config)"),
        ("Architecture", f"`{facts.model_type}`, {facts.num_parameters:,} parameters"),
        *(
            [("Adapter", f"{facts.adapter_parameters:,} trained parameters")]
            if facts.adapter_parameters
            else []
        ),
        ("Training", facts.adaptation),
        (
            "Exported weights",
            "PEFT adapter only" if facts.adapter_only else f"{facts.export_dtype} safetensors",
        ),
        ("Vocabulary", f"{facts.tokenizer_size:,} tokens (embedding rows: {facts.vocab_size:,})"),
    ]
    if facts.max_position_embeddings:
        rows.append(("Context length", f"{facts.max_position_embeddings:,} positions"))
    if facts.rope_parameters:
        rows.append(("RoPE", ", ".join(f"{k}={v}" for k, v in facts.rope_parameters.items())))
    return ["## Model", "", *_table(("", ""), rows), ""]


def _usage_section(facts: CardFacts) -> list[str]:
    if facts.adapter_only:
        base = facts.base_model or "BASE_MODEL"
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")',
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            *(
                [f"base.resize_token_embeddings({facts.vocab_size})  # rows for the tokens this run added"]
                if facts.vocab_grew
                else []
            ),
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER_OR_REPO")',
        ]
        note = "This folder holds the adapter only; it applies to the base model above." + (
            " The run added tokens (FIM sentinels) to the base, so the embedding and output head are saved with "
            "the adapter: resize the base's embeddings first, then load the adapter."
            if facts.vocab_grew
            else ""
        )
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")',
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")',
        ]
        note = "Adapters (if any) are merged: this folder loads with plain `transformers`, no PEFT needed."
    code += [
        'inputs = tokenizer("def fibonacci(n):", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))",
    ]
    return ["## Usage", "", note, "", "```python", *code, "```", ""]


def _fim_section(facts: CardFacts) -> list[str]:
    s = facts.sentinels
    if s is None:
        return [
            "## Fill-in-the-middle",
            "",
            "The tokenizer carries no known FIM sentinels; use the model for left-to-right completion.",
            "",
        ]
    if facts.fim:
        trained = (
            f"This run trained the FIM objective: rate {facts.fim.get('fim_rate')}, "
            f"SPM share {facts.fim.get('spm_rate')}, {facts.fim.get('level', 'document')}-level split."
        )
    else:
        trained = (
            "The tokenizer carries the sentinels, but this run's recipe records no FIM objective: infilling works "
            "only as well as the base model (or an earlier FIM stage) taught it."
        )
    psm = format_infill_prompt(_EXAMPLE_PREFIX, _EXAMPLE_SUFFIX, "psm", s)
    spm = format_infill_prompt(_EXAMPLE_PREFIX, _EXAMPLE_SUFFIX, "spm", s)
    rows = [("prefix", s.prefix), ("suffix", s.suffix), ("middle", s.middle), ("end of middle", s.end)]
    if s.pad:
        rows.append(("pad", s.pad))
    return [
        "## Fill-in-the-middle",
        "",
        trained,
        "",
        *_table(("sentinel", "token"), [(k, f"`{v}`") for k, v in rows]),
        "",
        "Prompt with the code before and after the gap; the model writes the middle and ends it with "
        f"`{s.end}`{'' if facts.adapter_only else ' (a stop token in `generation_config.json`)'}. Sentinels are "
        "single special tokens and no space is inserted next to them. PSM (prefix-suffix-middle) prompt:",
        "",
        "```text",
        psm,
        "```",
        "",
        "SPM (suffix-prefix-middle, Bavarian et al. 2022 App. D variant 2, as in Code Llama):",
        "",
        "```text",
        spm,
        "```",
        "",
        "```python",
        f'prompt = "{s.prefix}" + prefix + "{s.suffix}" + suffix + "{s.middle}"',
        "ids = tokenizer(prompt, return_tensors='pt', add_special_tokens=False)",
        "out = model.generate(**ids, max_new_tokens=128)",
        "middle = tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)",
        "```",
        "",
        *_repository_section(facts, s),
    ]


def _repository_section(facts: CardFacts, s: FIMSentinels) -> list[str]:
    """Repository-level infilling: how to put the repository's other files before the edited one."""
    if not facts.repository_level and facts.repo_tokens is None:
        return []
    tokens = facts.repo_tokens
    trained = (
        "This run trained on repository-level documents: each repository's files in dependency order, one file of "
        "each document FIM-transformed and the others left as its context."
        if facts.repository_level
        else "The tokenizer carries repository tokens; this run's recipe did not train repository-level documents."
    )
    how = (
        f"each file is introduced by `{tokens.file_sep}` and its path, the repository by `{tokens.repo_name}`"
        if tokens is not None
        else "each file is introduced by a comment line naming `repo/path` (the tokenizer has no repository tokens)"
    )
    example = format_repository_infill_prompt(
        _EXAMPLE_PREFIX,
        _EXAMPLE_SUFFIX,
        "psm",
        s,
        "myproject",
        [("text.py", "ASCII = range(128)\n")],
        "clean.py",
        tokens,
    )
    return [
        "### Repository-level infilling",
        "",
        trained
        + f" For a gap in one file of a project, show the project's other files first: {how}; the edited file's "
        "header comes right before the FIM prompt (`codetune infill --context FILE...` and "
        "`codetune.infill(..., context={path: code})` build it):",
        "",
        "```text",
        example,
        "```",
        "",
    ]


def _data_section(facts: CardFacts) -> list[str]:
    lines = ["## Training data", ""]
    if facts.sources:
        lines += _table(
            ("source", "kind", "location", "licence / provenance"),
            [(s["name"], s["kind"], f"`{s['location']}`", s["provenance"]) for s in facts.sources],
        )
    else:
        lines.append("Not recorded (no run `config.yaml` next to the checkpoint).")
    lines.append("")
    if facts.tokens_seen:
        lines += [
            f"Tokens trained on: about {facts.tokens_seen:,} token positions (steps × batch × sequence length × "
            "accumulation × devices; padding included).",
            "",
        ]
    d = facts.decontamination
    if d is None:
        lines.append("Decontamination: none recorded in the recipe.")
    elif d["applied"]:
        sets = ", ".join(d["sets"] or []) or "the configured benchmarks"
        ngram = f"{d['ngram']}-gram" if d.get("ngram") else "n-gram"
        lines.append(
            f"Decontamination: documents sharing a {ngram} with {sets} were removed before training."
        )
    else:
        lines.append("Decontamination: turned off in the recipe (`decontaminate: false`).")
    return [*lines, ""]


def _training_section(facts: CardFacts) -> list[str]:
    rows = []
    if facts.global_step is not None:
        rows.append(("Optimizer steps", f"{facts.global_step:,}"))
    if facts.hardware:
        rows.append(("Hardware (recipe)", ", ".join(f"{k}={v}" for k, v in facts.hardware.items())))
    if facts.train_seconds is not None:
        rows.append(("Wall-clock time", f"about {_duration(facts.train_seconds)} (run start to checkpoint)"))
    if not rows:
        return ["## Training", "", "Not recorded.", ""]
    return ["## Training", "", *_table(("", ""), rows), ""]


def _eval_section(facts: CardFacts) -> list[str]:
    if not facts.eval_results:
        return [
            "## Evaluation",
            "",
            "No evaluation results were found in the run directory (`eval/*.json`).",
            "",
        ]
    rows = []
    for result in facts.eval_results:
        notes = _scored_checkpoint(result)
        if isinstance(result.get("sandbox"), dict) and result["sandbox"].get("confined") is False:
            notes.append("UNSAFE: generated code ran without the sandbox (--unsafe_no_sandbox)")
        for score in scores_of(result, result["file"]):
            tasks = "" if score.num_tasks is None else str(score.num_tasks)
            row = (score.benchmark, score.metric, f"{score.value:.4g}", score.task_set, tasks, score.decoding)
            rows.append((*row, "; ".join(notes), f"`{score.file}`"))
    header = ("benchmark", "metric", "value", "task set", "tasks", "decoding", "", "file")
    return ["## Evaluation", "", *_table(header, rows), ""]


def _scored_checkpoint(result: dict[str, Any]) -> list[str]:
    """Which checkpoint an eval scored, and whether it has been overwritten since (training resumed)."""
    checkpoint = result.get("checkpoint")
    if not isinstance(checkpoint, dict) or "path" not in checkpoint:
        return []
    path = Path(checkpoint["path"])
    note = f"scored {path.name}"
    if path.exists() and abs(path.stat().st_mtime - float(checkpoint.get("mtime", 0))) > 1e-3:
        note += " (rewritten since: these scores are of earlier weights)"
    return [note]


def _recipe_section(facts: CardFacts) -> list[str]:
    if facts.recipe is None:
        return []
    text = yaml.safe_dump(facts.recipe, sort_keys=False, default_flow_style=False).strip()
    return [
        "## Recipe",
        "",
        "The run's resolved configuration (`config.yaml`), credentials removed:",
        "",
        "```yaml",
        text,
        "```",
        "",
    ]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    def cell(value: str) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows),
    ]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- gathering the facts ------------------------------------------------------------------------


def gather_facts(
    checkpoint: TrainedCheckpoint,
    model: Any,
    dtype: str,
    adapter_only: bool,
    title: str,
    license: str | None,
    vocab_grew: bool = False,
) -> CardFacts:
    """What the card states, read from the checkpoint, the rebuilt model and the run directory."""
    run_dir = checkpoint.location.run_dir
    recipe = read_recipe(run_dir)
    config = model.config
    rope = getattr(config, "rope_parameters", None)
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad) if _is_peft(model) else 0
    return CardFacts(
        title=title,
        model_type=config.model_type,
        # Under an adapter the rebuilt base is frozen and the adapter trainable: the base is what a merge keeps.
        num_parameters=sum(p.numel() for p in model.parameters()) - adapter_params,
        adapter_parameters=adapter_params,
        vocab_size=model.get_input_embeddings().weight.shape[0],
        vocab_grew=vocab_grew,
        tokenizer_size=len(checkpoint.tokenizer),
        export_dtype=dtype,
        adaptation=describe_adaptation(checkpoint.spec, adapter_only),
        base_model=checkpoint.spec.name_or_path,
        adapter_only=adapter_only,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        rope_parameters=dict(rope) if isinstance(rope, dict) else None,
        sentinels=fim_sentinels(checkpoint.tokenizer),
        fim=fim_settings(recipe),
        repository_level=repository_level(recipe),
        repo_tokens=repo_tokens(checkpoint.tokenizer),
        sources=data_sources(recipe),
        tokens_seen=tokens_seen(recipe, checkpoint.global_step),
        decontamination=decontamination(recipe),
        hardware=hardware(recipe),
        train_seconds=train_seconds(run_dir, checkpoint.location.path),
        global_step=checkpoint.global_step,
        eval_results=read_eval_results(run_dir),
        recipe=strip_secrets(recipe, known_secrets()) if recipe is not None else None,
        license=license,
    )


def describe_adaptation(spec: ModelSpec, adapter_only: bool) -> str:
    """One phrase: full fine-tuning, or the adapter, its rank, the quantized base, and how it was exported."""
    adapter = spec.adapter
    if adapter.method == "full":
        return "trained from scratch (all weights)" if spec.config is not None else "full fine-tuning"
    name = {"lora": "LoRA", "dora": "DoRA"}.get(adapter.method, adapter.method)
    phrase = f"{name} (r={adapter.r}, alpha={adapter.alpha:g})"
    q = spec.quantization
    if q is not None:
        kind = f"a 4-bit {q.quant_type.upper()}" if q.bits == 4 else "an 8-bit (LLM.int8)"
        phrase += f" on {kind} base" + (f" (Q{name} during training)" if q.bits == 4 else "")
    if adapter_only:
        return phrase + ", exported as the adapter alone"
    return (
        phrase
        + ", merged into a full-precision (fp32) copy of the base"
        + (", never into the quantized weights" if q is not None else "")
    )


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
