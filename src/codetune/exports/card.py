"""The model card (README.md) an export carries: what the model is, how it was trained, how to prompt it.

Every statement comes from what the run recorded: the checkpoint (model spec, tokenizer, step), the run's
``fit_summary.json`` (the resolved data module — each source's class, location and objective, the FIM settings
applied, decontamination as it ran and what it removed —, the fit's validation losses, the Throughput counters,
the hardware) and the eval results, which the export copies into its own ``eval/`` so every file the card names
is in the folder. Nothing is inferred by searching the recipe for keys; what was not recorded is said to be
unknown. The recipe (``config.yaml``) is included verbatim with secrets stripped.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from codetune.checkpoints.format import TrainedCheckpoint
from codetune.checkpoints.locate import FIT_SUMMARY
from codetune.data.fim import FIMConfig, FIMTransform, format_infill_prompt, format_repository_infill_prompt
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
    """What the run started from, as the card states it: a Hub id, or a description of a local model (never a
    local path, which means nothing to a reader of the card). None: trained from a config, from scratch."""
    base_hub_id: str | None = None
    """The base's Hub id, for the metadata (only when it is one)."""
    adapter_only: bool = False
    adapter_parameters: int = 0
    """Trained adapter parameters (LoRA/DoRA weights, new token rows); 0 for full fine-tuning."""
    vocab_grew: bool = False
    """Training added embedding rows to the base (the FIM sentinels were new to it)."""
    max_position_embeddings: int | None = None
    rope_parameters: dict[str, Any] | None = None
    sentinels: FIMSentinels | None = None
    fim_prompt_code: str | None = None
    """Python lines that build the trained PSM prompt's ids from ``prefix`` and ``suffix`` (checked on this
    tokenizer: :func:`fim_prompt_code`); None: the plain string prompt."""
    fim: dict[str, Any] | None = None
    """The FIM settings the run applied (None: no source trained the FIM objective)."""
    repository_level: bool = False
    """The run trained on repository-level documents (a git source with ``repository_documents``)."""
    repo_tokens: RepoTokens | None = None
    """The repository and file tokens the tokenizer carries."""
    sources: list[dict[str, str]] = field(default_factory=list)
    """Training data: ``name``, ``kind``, ``location``, ``objective``, ``provenance``."""
    recorded: bool = False
    """The run left its record (``fit_summary.json``); without it data and training are "not recorded"."""
    tokens_seen: int | None = None
    """Token positions trained on (Throughput counter, padding included)."""
    real_tokens: int | None = None
    decontamination: dict[str, Any] | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    train_seconds: float | None = None
    global_step: int | None = None
    val_loss: dict[str, Any] = field(default_factory=dict)
    """``before`` / ``after`` the fit, and ``by_source``, as the fit measured them."""
    eval_results: list[dict[str, Any]] = field(default_factory=list)
    """Each with ``file``: its path inside the export folder."""
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


def read_fit_record(run_dir: Path | None) -> dict[str, Any] | None:
    """The run's record (``fit_summary.json``, written at the end of ``codetune fit``), or None."""
    path = run_dir / FIT_SUMMARY if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("%s is not valid JSON (%s); the card says the run's record is missing", path, err)
        return None
    return record if isinstance(record, dict) else None


def read_eval_results(run_dir: Path | None) -> list[dict[str, Any]]:
    """Eval result files of the run (``eval/**/*_results.json``, as ``codetune eval`` writes them), oldest first;
    ``path`` is where each is, ``file`` where the export puts its copy."""
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
            results.append({"file": str(path.relative_to(run_dir)), "path": str(path), **data})
    return results


def copy_eval_results(facts: CardFacts, folder: Path) -> None:
    """Copy the results files the card names into the export (``eval/...``), so every link on it resolves."""
    for result in facts.eval_results:
        target = folder / result["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result["path"], target)


def repository_level(record: dict[str, Any] | None) -> bool:
    """Whether the run's data had a git source joining files into repository documents (their default)."""
    return any(
        str(source.get("class_path", "")).endswith("GitRepos")
        and source.get("repository_documents", True) is not False
        for source in ((record or {}).get("data") or {}).get("sources", [])
    )


def recorded_sources(record: dict[str, Any] | None) -> list[dict[str, str]]:
    """The training sources as the run resolved them: class, location, objective, and what is known of licences."""
    found: list[dict[str, str]] = []
    for source in ((record or {}).get("data") or {}).get("sources", []):
        kind = str(source.get("class_path", "")).rsplit(".", 1)[-1] or "unknown"
        location = str(source.get("path"))
        found.append(
            {
                "name": str(source.get("name")),
                "kind": kind,
                "location": _shown_location(kind, location),
                "objective": str(source.get("objective", "unknown")),
                "provenance": _provenance(kind, location, source),
                **({"hub_id": location} if kind == "HFDataset" and not _is_local(location) else {}),
            }
        )
    return found


def _is_local(location: str) -> bool:
    return Path(location).expanduser().is_absolute() or Path(location).expanduser().exists()


def _shown_location(kind: str, location: str) -> str:
    """``@stdlib`` and Hub ids as they are; a local path by its last part only (the card is for other readers)."""
    if location == "@stdlib" or not _is_local(location):
        return f"`{location}`"
    return f"local {'folder' if kind == 'CodeFiles' else 'files'} `{Path(location).name}`"


def _provenance(kind: str, location: str, fields: dict[str, Any]) -> str:
    if fields.get("license"):
        return f"licence given in the recipe: {fields['license']}"
    if location == "@stdlib":
        return STDLIB_PROVENANCE
    if kind == "HFDataset" and not _is_local(location):
        return f"Hugging Face dataset `{location}`; see https://huggingface.co/datasets/{location} for its licence"
    return "local files; licence not recorded"


def recorded_decontamination(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Decontamination as the run applied it (settings and documents removed), or None when not recorded."""
    data = (record or {}).get("data") or {}
    curation = data.get("curation")
    if not isinstance(curation, dict) or "decontaminate" not in curation:
        return None
    curated = data.get("curated")
    return {
        "applied": bool(curation["decontaminate"]),
        "sets": curation.get("decontamination_sets"),
        "ngram": curation.get("decontamination_ngram"),
        # Streaming runs make no full pass, so they have no count.
        "removed": (curated.get("removed") or {}).get("contaminated", 0) if curated else None,
    }


def describe_base(name: str | None, revision: str | None = None) -> tuple[str | None, str | None]:
    """``(what the card says the base is, its Hub id)`` for a recorded ``model.name_or_path``: a Hub id (with the
    revision the run pinned); an earlier codetune run or a local model folder by what they are and their Hub id
    when they record one; never the local path."""
    if not name:
        return None, None
    local = Path(name).expanduser()
    if not local.is_absolute() and not local.exists():  # a Hub id
        return (f"{name} (revision {revision[:12]})" if revision else name), name
    config = local / "config.json"
    if config.is_file():
        try:
            origin = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        except (json.JSONDecodeError, OSError, AttributeError):
            origin = None
        if isinstance(origin, str) and origin and not _is_local(origin):
            return f"{origin} (a local copy)", origin
        return f"a local model folder ({local.name})", None
    return f"an earlier codetune run ({_run_name(local)})", None


def _run_name(path: Path) -> str:
    """``quickstart`` for ``.../runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt`` or the run folder."""
    parts = path.parts
    if "lightning_logs" in parts:
        index = len(parts) - 1 - parts[::-1].index("lightning_logs")
        return parts[index - 1] if index > 0 else path.name
    return path.stem if path.suffix == ".ckpt" else path.name


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
    if facts.base_hub_id:
        meta["base_model"] = facts.base_hub_id
    hf_datasets = [s["hub_id"] for s in facts.sources if s.get("hub_id")]
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
        "The validation losses and evaluation numbers above (where given) are the only measurements of this "
        "model's quality that codetune recorded.",
        "",
    ]
    return redact_text("\n".join(parts), secrets)


def _summary(facts: CardFacts) -> str:
    base = facts.base_model if facts.base_model else f"a freshly initialised `{facts.model_type}` config"
    return f"A code language model trained with codetune from {base}: {facts.adaptation}."


def _model_section(facts: CardFacts) -> list[str]:
    rows = [
        ("Base model", facts.base_model or "none (trained from a config)"),
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
        base = facts.base_hub_id or "BASE_MODEL"
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


_PROBES = [
    ("def f(x):\n    ", "\n    return y\n"),
    (" x = 1", "y"),
    ("", "z = 2\n"),
    ("a", ""),
    ("\nb", " c"),
]


def _prompt_code(s: FIMSentinels, dummy_space: bool) -> str:
    # transformers' Metaspace puts no dummy space after a special token, where training has the prefix's own.
    head = (
        f"{s.prefix!r} + prefix"
        if not dummy_space
        else (f"{s.prefix!r} + (' ' if prefix[:1] not in ('', ' ') else '') + prefix")
    )
    return (
        f"prompt = {head} + {s.suffix!r} + suffix + {s.middle!r}\n"
        "ids = tokenizer(prompt, return_tensors='pt')  # with the BOS the tokenizer adds, as in training"
    )


def fim_prompt_code(tokenizer) -> str | None:
    """The card's prompt lines that, run with ``tokenizer``, give exactly the training PSM prompt ids.

    A plain string works for byte-level BPE. A SentencePiece tokenizer whose dummy space goes only before the
    first piece of a text (transformers' Metaspace) needs a space after the prefix sentinel, where training
    encodes the prefix as text of its own with its dummy space (Code Llama: ``<PRE> {prefix} <SUF>{suffix} <MID>``),
    unless the prefix is empty or starts with a space. None: no set,
    or neither form reproduces training (the card then shows the plain one).
    """
    sentinels = fim_sentinels(tokenizer)
    if sentinels is None:
        return None
    try:
        transform = FIMTransform(FIMConfig(), tokenizer)
    except ValueError:
        return None
    for dummy_space in (False, True):
        code = _prompt_code(sentinels, dummy_space)
        ok = True
        for prefix, suffix in _PROBES:
            scope = {"tokenizer": tokenizer, "prefix": prefix, "suffix": suffix}
            exec(code, scope)  # the card's own lines, on this tokenizer
            if scope["ids"]["input_ids"][0].tolist() != transform.encode_infill_prompt(prefix, suffix, "psm"):
                ok = False
                break
        if ok:
            return code
    return None


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
        fim_sources = ", ".join(src["name"] for src in facts.sources if src["objective"] == "fim")
        trained = (
            f"This run trained the FIM objective on {fim_sources}: rate {facts.fim.get('fim_rate')}, "
            f"SPM share {facts.fim.get('spm_rate')}, {facts.fim.get('level', 'document')}-level split."
        )
    elif facts.recorded:
        trained = (
            "The tokenizer carries the sentinels, but no source of this run trained the FIM objective: "
            "infilling works only as well as the base model (or an earlier FIM stage) taught it."
        )
    else:
        trained = (
            "The tokenizer carries the sentinels; whether this run trained the FIM objective was not recorded "
            "(no fit_summary.json in the run)."
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
        facts.fim_prompt_code or _prompt_code(s, False),
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
            ("source", "kind", "location", "objective", "licence / provenance"),
            [(s["name"], s["kind"], s["location"], s["objective"], s["provenance"]) for s in facts.sources],
        )
    else:
        lines.append("Not recorded (the run has no `fit_summary.json`).")
    lines.append("")
    if facts.tokens_seen:
        real = f" ({facts.real_tokens:,} of them real, not padding)" if facts.real_tokens is not None else ""
        lines += [
            f"Tokens trained on: {facts.tokens_seen:,} token positions{real}, counted during the fit.",
            "",
        ]
    d = facts.decontamination
    if d is None:
        lines.append("Decontamination: not recorded.")
    elif d["applied"]:
        sets = ", ".join(d["sets"] or []) or "the configured benchmarks"
        ngram = f"{d['ngram']}-gram" if d.get("ngram") else "n-gram"
        removed = f" ({d['removed']:,} removed)" if d.get("removed") is not None else ""
        lines.append(
            f"Decontamination: documents sharing a {ngram} with {sets} were removed before training{removed}."
        )
    else:
        lines.append("Decontamination: turned off for this run (`decontaminate: false`).")
    return [*lines, ""]


def _training_section(facts: CardFacts) -> list[str]:
    rows = []
    if facts.global_step is not None:
        rows.append(("Optimizer steps", f"{facts.global_step:,}"))
    if facts.hardware:
        rows.append(("Hardware", ", ".join(f"{k}={v}" for k, v in facts.hardware.items())))
    if facts.train_seconds is not None:
        rows.append(
            ("Training time", f"{_duration(facts.train_seconds)} (the fit, without data preparation)")
        )
    if not rows:
        return ["## Training", "", "Not recorded.", ""]
    return ["## Training", "", *_table(("", ""), rows), ""]


def _eval_section(facts: CardFacts) -> list[str]:
    lines = ["## Evaluation", ""]
    loss = facts.val_loss
    if loss.get("after") is not None:
        before = f"{loss['before']:.4f} before training, " if loss.get("before") is not None else ""
        lines.append(f"Validation loss on the run's held-out split: {before}{loss['after']:.4f} after.")
        for name, values in (loss.get("by_source") or {}).items():
            was = f"{values['before']:.4f} -> " if values.get("before") is not None else ""
            lines.append(f"- {name}: {was}{values['after']:.4f}")
        lines.append("")
    if not facts.eval_results:
        return [*lines, "No `codetune eval` results were found in the run directory.", ""]
    rows = []
    for result in facts.eval_results:
        notes = _scored_checkpoint(result)
        if isinstance(result.get("sandbox"), dict) and result["sandbox"].get("confined") is False:
            notes.append("UNSAFE: generated code ran without the sandbox (--unsafe_no_sandbox)")
        for score in scores_of(result, result["file"]):
            tasks = "" if score.num_tasks is None else str(score.num_tasks)
            row = (score.benchmark, score.metric, f"{score.value:.4g}", score.task_set, tasks, score.decoding)
            rows.append((*row, "; ".join(notes), f"`{score.file}`"))
    header = ("benchmark", "metric", "value", "task set", "tasks", "decoding", "", "file (in this folder)")
    return [*lines, *_table(header, rows), ""]


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
    base_model: str | None = None,
) -> CardFacts:
    """What the card states, read from the checkpoint, the rebuilt model and the run's record
    (``base_model``: the ``--base_model`` the export used in place of the recorded one)."""
    run_dir = checkpoint.location.run_dir
    recipe = read_recipe(run_dir)
    record = read_fit_record(run_dir)
    data = (record or {}).get("data") or {}
    config = model.config
    rope = getattr(config, "rope_parameters", None)
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad) if _is_peft(model) else 0
    revision = (checkpoint.spec.extra or {}).get("revision") if base_model is None else None
    base, hub_id = describe_base(base_model or checkpoint.spec.name_or_path, revision)
    tokens = (record or {}).get("tokens") or {}
    loss = (record or {}).get("val_loss") or {}
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
        base_model=base,
        base_hub_id=hub_id,
        adapter_only=adapter_only,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        rope_parameters=dict(rope) if isinstance(rope, dict) else None,
        sentinels=fim_sentinels(checkpoint.tokenizer),
        fim_prompt_code=fim_prompt_code(checkpoint.tokenizer),
        fim=data.get("fim"),
        repository_level=repository_level(record),
        repo_tokens=repo_tokens(checkpoint.tokenizer),
        sources=recorded_sources(record),
        recorded=record is not None,
        tokens_seen=tokens.get("total"),
        real_tokens=tokens.get("real"),
        decontamination=recorded_decontamination(record),
        hardware=(record or {}).get("hardware") or {},
        train_seconds=(record or {}).get("fit_seconds"),
        global_step=checkpoint.global_step,
        val_loss={**loss, "by_source": (record or {}).get("val_loss_by_source") or {}},
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
