"""The LightningDataModule recipes configure: sources -> curation -> tokenize -> objective -> mix -> pack -> batches.

Map-style (default): every source is read and curated together once, tokenized with ``datasets.map`` and packed,
and both results are cached (:mod:`codetune.data.corpus`, :mod:`codetune.data.rows`); epochs reshuffle the rows.
Streaming (``streaming: true``): nothing is materialised; each rank and loader worker reads its own share of
the documents and packs it on the fly (:mod:`codetune.data.batches`). Either way the train loader's position is
saved in checkpoints and a resumed run continues with exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from codetune.data.batches import (
    POSITION_KEY,
    PackedBatches,
    ResumableLoader,
    StreamingBatches,
    collate,
)
from codetune.data.chat import ChatFiles, resolve_template
from codetune.data.corpus import (
    DocumentEncoder,
    Objective,
    TokenizedCorpus,
    corpus_key,
    default_objective,
    stream_documents,
    tokenizer_fingerprint,
)
from codetune.data.curation import CurationConfig, Curator, Split
from codetune.data.fim import FIMConfig, FIMTransform
from codetune.data.git import GitRepos
from codetune.data.mixing import MixConfig, check_weights
from codetune.data.packing import RowSummary
from codetune.data.repository import RepositoryAssembler, repo_tokens
from codetune.data.rows import RowBuilder, RowStore
from codetune.data.sources import (
    CodeFiles,
    HFDataset,
    JsonlFiles,
    ParquetFiles,
    _resolve_files,
    relative_note,
)
from codetune.data.tokenizer import TokenizerSpec, backend_copy, build_tokenizer
from codetune.seeding import run_seed
from codetune.storage import cache_root

log = logging.getLogger(__name__)

__all__ = ["CodeDataModule", "Split"]

_OBJECTIVES = ("fim", "causal", "chat")
_LOCAL_SUFFIXES = {
    JsonlFiles: (".jsonl", ".jsonl.gz"),
    ChatFiles: (".jsonl", ".jsonl.gz"),
    ParquetFiles: (".parquet",),
}


def _recorded_path(source: Any) -> str:
    """A source's location as the record keeps it: absolute when it is a local path, else as given."""
    path = str(getattr(source, "path", ""))
    if path.startswith("@") or "://" in path:
        return path
    local = os.path.expanduser(path)
    return os.path.abspath(local) if os.path.exists(local) or isinstance(source, CodeFiles) else path


def _warn_fim_not_applied(
    sources: list[Any], given: dict[str, str] | None, resolved: dict[str, str], fim: FIMConfig | None
) -> None:
    """Say, before any data is read, which sources train without the module's FIM objective: only code trees
    default to ``fim``; JSONL, Parquet and datasets could hold anything and need ``objectives`` to say so."""
    if fim is None:
        return
    for source in sources:
        if resolved[source.name] != "causal" or source.name in (given or {}):
            continue
        log.warning(
            "data.sources[%s] (%s) trains plain causal LM, not FIM, although data.fim is set: only code trees "
            "default to FIM; if it is code, set data.objectives: {%s: fim} (or {%s: causal} to silence this)",
            source.name,
            type(source).__name__,
            source.name,
            source.name,
        )


def no_validation_note(train_documents: int, val_fraction: float) -> str:
    """The warning for a split that left no validation documents, with a ``val_fraction`` that holds some out."""
    total = max(train_documents, 1)
    # The split hashes each document, so a fraction f holds out about f * n: ask for about two (at most half).
    suggested = min(0.5, math.ceil(200 / total) / 100)
    return (
        f"train {train_documents} documents, validation 0 (data.split.val_fraction={val_fraction}): this run has "
        f"no validation loss; set data.split.val_fraction={suggested:g} to hold out about "
        f"{max(1, round(suggested * train_documents))} (or add documents)"
    )


class _Rows(Dataset):
    """Map-style view of stored rows (validation)."""

    def __init__(self, rows: RowStore | list[dict[str, Any]], limit: int | None) -> None:
        self.rows = rows
        self.n = len(rows) if limit is None else min(limit, len(rows))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i >= self.n:
            raise IndexError(i)
        return self.rows.row(i) if isinstance(self.rows, RowStore) else self.rows[i]


class _StreamRows:
    """Endless rows of one streaming shard: passes over the sources, packed and mixed (picklable for workers)."""

    def __init__(self, module: CodeDataModule) -> None:
        self.sources = module.sources
        self.curation, self.split = module.curation, module.split
        self.encoder = module.encoder
        self.builder_args = module._builder_args(module.mix.weights or {module.source_names[0]: 1.0})
        self.stop, self.num_tokens = module.mix.stop, module.mix.num_tokens

    def __call__(self, shard: int, num_shards: int):
        curator = Curator(self.curation, self.split)
        by_name = {s.name: s for s in self.sources}
        passes: dict[str, int] = {}

        def open_documents(name: str, _: int):
            repeat = passes.get(name, 0)
            passes[name] = repeat + 1
            return stream_documents(by_name[name], curator, self.encoder, "train", shard, num_shards, repeat)

        while True:
            builder = RowBuilder(**self.builder_args, stop=self.stop, num_tokens=self.num_tokens)
            produced = 0
            for row in builder.rows(open_documents):
                produced += 1
                yield row
            if produced == 0:
                raise ValueError(
                    f"streaming shard {shard} of {num_shards} got no rows: a source has fewer training documents "
                    "than ranks x loader workers; use fewer workers or map-style data"
                )


def repository_assembler(sources: list[Any], tokenizer: Any, seq_len: int) -> RepositoryAssembler | None:
    """The joiner of repository documents for the git sources that ask for them (None when none does)."""
    budgets = {
        s.name: s.max_document_tokens or seq_len
        for s in sources
        if isinstance(s, GitRepos) and s.repository_documents
    }
    if not budgets:
        return None
    return RepositoryAssembler(backend_copy(tokenizer, text_only=True), repo_tokens(tokenizer), budgets)


class CodeDataModule(L.LightningDataModule):
    """Packed fixed-length rows for causal LM, FIM and instruction training, mixed from several sources."""

    def __init__(
        self,
        tokenizer: TokenizerSpec,
        sources: list[CodeFiles | GitRepos | JsonlFiles | ParquetFiles | HFDataset | ChatFiles],
        seq_len: int = 512,
        batch_size: int = 8,
        fim: FIMConfig | None = FIMConfig(),  # noqa: B008 (immutable in practice; jsonargparse shows it as the default)
        objectives: dict[str, Literal["fim", "causal", "chat"]] | None = None,
        mix: MixConfig | None = None,
        curation: CurationConfig | None = None,
        split: Split | None = None,
        chat_template: str = "codetune",
        streaming: bool = False,
        shuffle: bool = True,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int | None = None,
    ) -> None:
        """
        Args:
            tokenizer: The one tokenizer of the run; the model gets it from here.
            sources: Where documents come from: code trees (plain entries), or ``class_path`` entries for
                ``codetune.data.git.GitRepos`` (git repositories, repository-level documents),
                ``codetune.data.sources.JsonlFiles`` / ``ParquetFiles`` / ``HFDataset`` and
                ``codetune.data.chat.ChatFiles`` (conversations). Names must be distinct.
            seq_len: Tokens per packed row.
            batch_size: Rows per batch on each device.
            fim: Fill-in-the-middle for ``fim`` sources (Code Llama defaults); null turns FIM off. Its sentinels
                are the tokenizer's (``tokenizer.sentinels``).
            objectives: Per source name: ``fim``, ``causal`` or ``chat``. Unnamed sources: ``chat`` for
                ChatFiles, ``fim`` for code trees and git repositories when ``fim`` is set, else ``causal``.
            mix: Token shares of the sources (weights must sum to 1). Null: each source once, in proportion.
            curation: Dedup, decontamination and redaction.
            split: Validation hold-out, made after dedup so no copy crosses it.
            chat_template: ``codetune`` or ``chatml`` (shipped), ``tokenizer`` (the tokenizer's own), or Jinja.
            streaming: Read, tokenize and pack on the fly, for corpora larger than memory or disk cache. The
                stream repeats without end: stop training with ``trainer.max_steps``.
            shuffle: Reshuffle the packed rows every epoch (map-style only).
            num_workers: DataLoader worker processes.
            num_proc: Processes for tokenization (``datasets.map``); null: one (tokenizers uses threads).
            seed: Seed of the row shuffle; ``null``: the run's seed (``seed_everything``).
        """
        super().__init__()
        names = [getattr(s, "name", None) for s in sources or []]
        self._validate(
            sources, names, seq_len, batch_size, fim, objectives, mix, streaming, num_workers, curation
        )
        self.tokenizer_spec = tokenizer
        self.sources = list(sources)
        self.source_names: list[str] = names
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.fim = fim
        self.objectives: dict[str, Objective] = {
            s.name: (objectives or {}).get(s.name) or default_objective(s, fim is not None) for s in sources
        }
        _warn_fim_not_applied(sources, objectives, self.objectives, fim)
        self.mix = mix or MixConfig()
        self.split = split or Split()
        self.curation = curation or CurationConfig()
        self.chat_template = chat_template
        self.max_val_rows = self.split.max_val_rows
        self.streaming = streaming
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.seed = run_seed(seed)
        self.tokenizer = build_tokenizer(tokenizer)
        if "chat" in self.objectives.values():
            resolve_template(
                chat_template, self.tokenizer
            )  # an unknown name fails now, not after reading data
        self.fim_transform = FIMTransform(fim, self.tokenizer) if fim is not None else None
        self.repository = repository_assembler(self.sources, self.tokenizer, seq_len)
        self.encoder = DocumentEncoder(
            self.tokenizer,
            self.objectives,
            offsets=fim is not None and fim.level == "context",
            chat_template=chat_template,
            repository=self.repository,
        )
        self.corpus: TokenizedCorpus | None = None
        self.train_rows: RowStore | None = None
        self.val_rows: RowStore | list[dict[str, Any]] | None = None
        self._train_batches: PackedBatches | StreamingBatches | None = None
        self._train_loader: ResumableLoader | None = None

    # -- checks ---------------------------------------------------------------------------------------------

    @staticmethod
    def _validate(
        sources, names, seq_len, batch_size, fim, objectives, mix, streaming, num_workers, curation
    ) -> None:
        """One-line errors for a bad recipe, before any tokenizer is trained or file read."""
        if seq_len < 16:
            raise ValueError(f"data.seq_len must be at least 16, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if not sources:
            raise ValueError(
                "data.sources is empty: give at least one source (e.g. CodeFiles with path: '@stdlib')"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: names must be distinct, got {names}; set `name:` on each source")
        for source in sources:
            where = f"data.sources[{source.name}]"
            if isinstance(source, GitRepos):
                source.repositories()  # not a repository / no git: one line now, before any tokenizer is built
                if source.repository_documents and fim is not None and fim.level == "context":
                    raise ValueError(
                        f"{where}: repository documents take document-level FIM (one file of each document is "
                        "transformed, the others are its context); set data.fim.level: document, or "
                        "repository_documents: false"
                    )
            if isinstance(source, CodeFiles):
                if not source.root.is_dir():
                    what = "does not exist" if not source.root.exists() else "is not a directory"
                    raise FileNotFoundError(f"{where}: path {source.path} {what}{relative_note(source.path)}")
            elif type(source) in _LOCAL_SUFFIXES:
                _resolve_files(source.path, _LOCAL_SUFFIXES[type(source)], where)
        for name, objective in (objectives or {}).items():
            if name not in names:
                raise ValueError(f"data.objectives names unknown source {name!r}; the sources are {names}")
            if objective not in _OBJECTIVES:
                raise ValueError(f"data.objectives[{name}] must be one of {_OBJECTIVES}, got {objective!r}")
        for source in sources:
            chosen = (objectives or {}).get(source.name)
            if isinstance(source, ChatFiles) and chosen not in (None, "chat"):
                raise ValueError(
                    f"data.objectives[{source.name}]: conversations (ChatFiles) can only be 'chat'"
                )
            if not isinstance(source, ChatFiles) and chosen == "chat":
                raise ValueError(
                    f"data.objectives[{source.name}]: 'chat' needs conversations; read the file with "
                    "codetune.data.chat.ChatFiles"
                )
            if chosen == "fim" and fim is None:
                raise ValueError(
                    f"data.objectives[{source.name}] is 'fim' but data.fim is null; set data.fim"
                )
        if mix is not None and mix.weights is not None:
            check_weights(mix.weights, names)
        elif streaming and len(sources) > 1:
            raise ValueError(
                "data.streaming with several sources needs data.mix.weights (token shares summing to 1): "
                "natural proportions need a full pass over the data"
            )

    # -- building -------------------------------------------------------------------------------------------

    def _builder_args(self, weights: dict[str, float]) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "eos_id": self.tokenizer.eos_token_id,
            "pad_id": self.tokenizer.pad_token_id,
            "source_names": self.source_names,
            "objectives": self.objectives,
            "fim": self.fim_transform,
            "weights": weights,
        }

    def _key(self, *parts: Any) -> str:
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    @property
    def _cache(self):
        return cache_root(self.tokenizer_spec.cache_dir) / "data"

    def _pack_settings(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "fim": asdict(self.fim) if self.fim is not None else None,
            "objectives": self.objectives,
            "source_names": self.source_names,
            "eos": self.tokenizer.eos_token_id,
            "pad": self.tokenizer.pad_token_id,
        }

    def _build_packed(self) -> None:
        key = corpus_key(
            self.tokenizer,
            self.sources,
            self.curation,
            self.split,
            self.objectives,
            self.encoder.offsets,
            self.chat_template,
            self.repository,
        )
        corpus = TokenizedCorpus.build_or_load(
            self.sources, self.curation, self.split, self.encoder, key, self._cache, self.num_proc
        )
        self.corpus = corpus
        if self.mix.weights is not None:
            weights, stop = check_weights(self.mix.weights, self.source_names), self.mix.stop
        else:
            weights, stop = self._natural_weights("train"), "each_once"
        settings = self._pack_settings()
        train_key = self._key("train", key, settings, weights, stop, self.mix.num_tokens)
        self.train_rows = self._store(
            f"rows-{train_key}",
            lambda: RowBuilder(**self._builder_args(weights), stop=stop, num_tokens=self.mix.num_tokens),
            "train",
        )
        val_weights = self._natural_weights("validation")
        if val_weights:
            val_key = self._key("validation", key, settings, val_weights)
            self.val_rows = self._store(
                f"rows-{val_key}",
                lambda: RowBuilder(**self._builder_args(val_weights), stop="each_once"),
                "validation",
            )
        else:
            self.val_rows = []
        log.info("data:\n%s", "\n".join(self.summary_lines()))
        splits = corpus.report.curation["splits"]
        if splits["validation"] == 0:
            log.warning("data: %s", no_validation_note(splits["train"], self.split.val_fraction))

    def _natural_weights(self, split: str) -> dict[str, float]:
        assert self.corpus is not None
        tokens = {n: self.corpus.tokens(n, split) for n in self.source_names}
        total = sum(tokens.values())
        return {n: t / total for n, t in tokens.items()} if total else {}

    def _store(self, folder_name: str, builder_factory, split: str) -> RowStore:
        folder = self._cache / folder_name
        if (folder / "meta.json").is_file():
            return RowStore(folder)
        assert self.corpus is not None
        corpus = self.corpus
        builder = builder_factory()
        rows = builder.rows(lambda name, k: corpus.documents(name, split, k))

        def extra() -> dict[str, Any]:
            return {"packing": builder.packing, "mix": asdict(builder.mixer.stats)}

        return RowStore.write(folder, rows, self.seq_len, self.source_names, extra)

    def _build_streaming_val(self) -> list[dict[str, Any]]:
        weights = self.mix.weights or {self.source_names[0]: 1.0}
        builder = RowBuilder(
            **self._builder_args(check_weights(weights, self.source_names)), stop="each_once"
        )
        curator = Curator(self.curation, self.split)
        by_name = {s.name: s for s in self.sources}
        rows = []
        for row in builder.rows(
            lambda name, k: stream_documents(by_name[name], curator, self.encoder, "validation")
        ):
            rows.append(row)
            if self.max_val_rows is not None and len(rows) >= self.max_val_rows:
                break
        return rows

    def prepare_data(self) -> None:
        """Build the caches once per node (Lightning calls this on local rank 0 before ``setup``, and again for each
        Trainer call: ``fit`` after the summary's opening ``validate``)."""
        if not self.streaming and self.train_rows is None:
            self._build_packed()

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None or (self.streaming and self.val_rows is not None):
            return
        if self.streaming:
            self.val_rows = self._build_streaming_val()
        else:
            self._build_packed()

    # -- summaries ------------------------------------------------------------------------------------------

    def summary_lines(self) -> list[str]:
        """What was read, removed and packed (map-style data; streaming has no full pass to report)."""
        lines: list[str] = []
        if self.corpus is not None:
            lines.extend(self.corpus.report.summary().splitlines())
        if self.train_rows is not None:
            lines.extend("train " + line for line in self.train_rows.summary.lines(self.objectives))
        return lines

    def record(self) -> dict[str, Any]:
        """What this data module resolved to, for the run's record (``fit_summary.json``) and the model card:
        each source's class, location and objective, the FIM settings that were applied, curation as configured
        and as it came out, and what was skipped."""
        fim_used = "fim" in self.objectives.values()
        record: dict[str, Any] = {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "sources": [
                {
                    "name": s.name,
                    "class_path": f"{type(s).__module__}.{type(s).__qualname__}",
                    "path": _recorded_path(s),
                    "objective": self.objectives[s.name],
                    **({"license": s.license} if getattr(s, "license", None) else {}),
                    **({"repository_documents": s.repository_documents} if isinstance(s, GitRepos) else {}),
                }
                for s in self.sources
            ],
            "fim": asdict(self.fim) if self.fim is not None and fim_used else None,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "curation": asdict(self.curation),
            "split": asdict(self.split),
            "streaming": self.streaming,
        }
        if self.corpus is not None:
            report = self.corpus.report
            record["curated"] = {k: report.curation[k] for k in ("seen", "removed", "splits")}
            record["skipped"] = report.skipped
            record["hints"] = report.hints
        return record

    @property
    def train_summary(self) -> RowSummary | None:
        """Counts over every training row (map-style data)."""
        return self.train_rows.summary if self.train_rows is not None else None

    # -- loaders --------------------------------------------------------------------------------------------

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def train_batches(self) -> PackedBatches | StreamingBatches:
        """The rank's batch stream behind the train loader (preview reads it directly, with span metadata)."""
        self.setup("fit")
        rank, world = self._rank()
        if self.streaming:
            fingerprint = self._key(
                "stream",
                tokenizer_fingerprint(self.tokenizer),
                [asdict(s) for s in self.sources],
                asdict(self.curation),
                asdict(self.split),
                self._pack_settings(),
                asdict(self.mix),
            )
            return StreamingBatches(
                _StreamRows(self), self.batch_size, rank, world, self.num_workers, fingerprint
            )
        assert self.train_rows is not None
        return PackedBatches(self.train_rows, self.batch_size, self.shuffle, self.seed, rank, world)

    def train_dataloader(self) -> ResumableLoader:
        # Lightning warns about any IterableDataset with a length; ours deals batches to workers itself.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        self._train_batches = self.train_batches()
        self._train_loader = ResumableLoader(
            self._train_batches, num_workers=self.num_workers, track_consumed=self.trainer is not None
        )
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        rows = self.val_rows if self.val_rows is not None else []
        return DataLoader(
            _Rows(rows, self.max_val_rows),
            batch_size=self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The trainer is about to train on this batch: it is now consumed, so a checkpoint resumes after it.
        if isinstance(batch, dict) and POSITION_KEY in batch:
            position = batch.pop(POSITION_KEY)
            if self._train_batches is not None:
                self._train_batches.consumed = tuple(position)
        return batch
