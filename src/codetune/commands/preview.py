"""``codetune preview``: the rows a recipe would train on, without building the model.

The recipe is parsed by the same parser as ``codetune fit`` (so overrides, nested data YAMLs and errors are
identical), but only the data module is instantiated: tokenizer and data, never model weights. The rows come
from the train loader's own batch stream (rank 0, epoch 0, in order), so they are exactly the first rows of the
first batches ``fit`` would see.
"""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule

from codetune.commands.fit import CodetuneCLI
from codetune.data.batch import IGNORE_INDEX, TokenKind
from codetune.data.packing import RowSummary
from codetune.data.repository import file_headers


def recipe_datamodule(config: str, overrides: list[str]) -> Any:
    """The data module a recipe configures (parsed exactly as ``codetune fit`` parses it), without a model."""

    class _DataOnly(CodetuneCLI):
        """Parses the whole recipe, instantiates only ``data``."""

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            parser = ArgumentParser(exit_on_error=False)
            parser.add_subclass_arguments(LightningDataModule, "data", required=True)
            data = parser.instantiate(parser.parse_object({"data": self.config["data"].as_dict()}))
            self.datamodule = data.data

        def instantiate_trainer(self, **kwargs: Any) -> Any:  # pragma: no cover - never called
            raise AssertionError("preview builds no trainer")

    if not Path(config).is_file():
        raise FileNotFoundError(f"preview: --config {config}: no such file")
    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments are passed explicitly, as `codetune fit` does
    try:
        with _without_fit_keys(Path(config)) as recipe:
            cli = _DataOnly(args=["--config", str(recipe), *overrides], run=False)
    finally:
        sys.argv = argv
    return cli.datamodule


FIT_ONLY_KEYS = ("ckpt_path", "weights_only")
"""Arguments of ``Trainer.fit`` that LightningCLI saves at the top of a run's ``config.yaml``."""


@contextmanager
def _without_fit_keys(config: Path):
    """The recipe without the keys only ``fit`` has (``ckpt_path``, ``weights_only``), which a run's saved ``config.yaml`` carries.
    A saved config is fully resolved (nested YAMLs inlined), so its copy reads the same from a temporary folder."""
    import yaml

    try:
        recipe = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        recipe = None  # the parser reports it in its own words
    if not isinstance(recipe, dict) or not set(recipe) & set(FIT_ONLY_KEYS):
        yield config
        return
    for key in FIT_ONLY_KEYS:
        recipe.pop(key, None)
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / config.name
        copy.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        yield copy


def _row_json(row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    ids = [int(i) for i in row["input_ids"]]
    return {
        "input_ids": ids,
        "labels": [int(i) for i in row["labels"]],
        "position_ids": [int(i) for i in row["position_ids"]],
        "token_kind": [int(i) for i in row["token_kind"]],
        "source_index": [int(i) for i in row["source_index"]],
        "text": tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        "documents": row["documents"],
    }


def _file_boundaries(records: list[dict[str, Any]], datamodule: Any) -> list[str]:
    """Add each repository span's files (``{"path", "at"}``: where its header starts in the row's ``text``) to the
    records; return one line per such span for the printed preview."""
    corpus = datamodule.corpus
    if corpus is None or "layout" not in corpus.dataset.column_names:
        return []
    wanted = {str(span["doc_id"]) for r in records for span in r["documents"]}
    table = corpus.dataset.select_columns(["doc_id", "text", "layout"])
    headers = {
        doc_id: file_headers(text, layout)
        for doc_id, text, layout in zip(table["doc_id"], table["text"], table["layout"], strict=True)
        if doc_id in wanted and layout
    }
    lines = []
    tokenizer = datamodule.tokenizer
    for n, record in enumerate(records):
        for span in record["documents"]:
            found = headers.get(str(span["doc_id"]))
            if not found:
                continue
            ids = record["input_ids"][span["start"] : span["end"]]
            start = len(tokenizer.decode(record["input_ids"][: span["start"]], skip_special_tokens=False))
            text = tokenizer.decode(ids, skip_special_tokens=False)
            files = []
            for header in found:
                at = text.find(header)
                if at >= 0:
                    files.append({"path": header.strip(), "at": start + at})
            span["files"] = files
            fim = f", FIM {span['fim']}" if span.get("fim") else ""
            shown = " | ".join(f["path"] for f in files) or "(inside one file)"
            lines.append(f"row {n} {span['doc_id']} chunk {span['chunk']}{fim}: {shown}")
    return lines


def preview_rows(datamodule: Any, rows: int, split: str = "train") -> list[dict[str, Any]]:
    """The first ``rows`` rows of ``split`` as the loader yields them, with span metadata."""
    datamodule.setup("fit" if split == "train" else "validate")
    out: list[dict[str, Any]] = []
    if split == "train":
        # The loader takes batches from its workers in turn; worker j of n yields every n-th batch.
        stream = datamodule.train_batches()
        workers = max(1, datamodule.num_workers)
        lanes = [stream.batches((0, 0), j, workers, documents=True) for j in range(workers)]
        while len(out) < rows and lanes:
            for lane in list(lanes):
                item = next(lane, None)
                if item is None:
                    lanes.remove(lane)
                    continue
                out.extend(item[0])
                if len(out) >= rows:
                    break
    elif split == "validation":
        val = datamodule.val_rows or []
        limit = len(val) if datamodule.max_val_rows is None else min(len(val), datamodule.max_val_rows)
        for i in range(min(rows, limit)):
            out.append(val.row(i, documents=True) if hasattr(val, "row") else val[i])
    else:
        raise ValueError(f"preview: split must be 'train' or 'validation', got {split!r}")
    return out[:rows]


def summarise(rows: list[dict[str, Any]], datamodule: Any) -> RowSummary:
    summary = RowSummary()
    for row in rows:
        summary.add(row, datamodule.source_names)
    return summary


def preview(
    config: str,
    rows: int = 8,
    out: str | None = None,
    split: str = "train",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Write the rows a recipe trains on (JSONL) and print what is in them; builds no model.

    Args:
        config: The recipe (``recipes/quickstart.yaml``) or anything ``codetune fit --config`` accepts.
        rows: How many rows to write and summarise.
        out: JSONL file for the rows (one object per row: input_ids, labels, position_ids, text, documents);
            None writes none.
        split: ``train`` (the train loader's first rows, in order) or ``validation``.
        overrides: Extra recipe arguments, as on the command line (``--data.init_args.seq_len=128``).

    Returns:
        ``{"rows": [...], "summary": {...}}`` with the same numbers as printed.
    """
    if rows < 1:
        raise ValueError(f"preview: rows must be >= 1, got {rows}")
    datamodule = recipe_datamodule(config, list(overrides or []))
    selected = preview_rows(datamodule, rows, split)
    records = [_row_json(r, datamodule.tokenizer) for r in selected]
    boundaries = _file_boundaries(records, datamodule)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    shown = summarise(selected, datamodule)
    fim_sources = [n for n, o in datamodule.objectives.items() if o == "fim"]
    rates = shown.fim_rates(fim_sources)
    summary: dict[str, Any] = {
        "rows": len(records),
        "real_token_fraction": shown.real_fraction,
        "token_shares": shown.shares(),
        "fim_rate": rates[0] if rates else None,
        "psm_rate": rates[1] if rates else None,
        "spm_rate": rates[2] if rates else None,
        "trained_token_fraction": _trained_fraction(selected),
    }
    full = datamodule.train_summary
    lines = [
        f"preview of {len(records)} {split} rows (seq_len {datamodule.seq_len}):",
        *shown.lines(datamodule.objectives),
    ]
    lines.append(f"tokens with a label: {summary['trained_token_fraction']:.4f} of real tokens")
    if full is not None:
        summary["all_train_rows"] = {
            "rows": full.rows,
            "real_token_fraction": full.real_fraction,
            "token_shares": full.shares(),
            "fim_rates": full.fim_rates(fim_sources),
        }
        lines.append("all training rows:")
        lines.extend("  " + line for line in full.lines(datamodule.objectives))
    if datamodule.corpus is not None:
        report = datamodule.corpus.report
        summary["skipped"] = report.skipped
        summary["curation"] = {"removed": report.curation["removed"], "splits": report.curation["splits"]}
        lines.extend(report.summary().splitlines())
    if boundaries:
        lines.append("repository documents (files in order, as their headers read):")
        lines.extend("  " + line for line in boundaries)
    if out is not None:
        lines.append(f"wrote {len(records)} rows to {out}")
    print("\n".join(lines), file=sys.stderr)
    return {"rows": records, "summary": summary}


def preview_command(
    recipe: str,
    rows: int = 8,
    out: str | None = None,
    split: str = "train",
    overrides: list[str] | None = None,
) -> None:
    """Write the rows a recipe trains on (JSONL) and summarise them; builds no model.

    Args:
        recipe: The recipe (``codetune preview --config recipes/quickstart.yaml``).
        rows: How many rows to write and summarise.
        out: JSONL file for the rows (input_ids, labels, position_ids, text, documents); none: summary only.
        split: ``train`` (the train loader's first rows, in order) or ``validation``.
        overrides: Recipe arguments as for ``codetune fit``, e.g. ``["--data.init_args.seq_len=128"]``.
    """
    preview(recipe, rows=rows, out=out, split=split, overrides=overrides)


def _trained_fraction(rows: list[dict[str, Any]]) -> float:
    real = trained = 0
    for row in rows:
        for kind, label in zip(row["token_kind"], row["labels"], strict=True):
            if kind != TokenKind.PAD:
                real += 1
                trained += label != IGNORE_INDEX
    return float(trained / real) if real else 0.0


__all__ = ["preview", "preview_command", "preview_rows"]
