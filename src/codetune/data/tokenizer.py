"""The one tokenizer builder: loads or trains the tokenizer and owns its FIM sentinels.

Data and model both get their tokenizer from :func:`build_tokenizer` (the CLI links the data module's
tokenizer into the model), so the token ids the data side writes and the embedding size can never disagree.

The FIM sentinel set is chosen once, here (``data.tokenizer.sentinels``, or the set a pretrained tokenizer
carries), and recorded in the tokenizer itself (its ``tokenizer_config.json``), so the FIM transform, the FIM
stage, the model card, exports and inference all read it back with :func:`fim_sentinels` instead of being told
again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from codetune.data.repository import repo_tokens
from codetune.data.sources import CodeFiles
from codetune.llama_cpp import tokenizer_folder
from codetune.storage import atomic_folder, cache_root

log = logging.getLogger(__name__)

LLAMA_CPP_PREFIX = "llama.cpp:"
"""``tokenizer.name_or_path: llama.cpp:starcoder`` loads llama.cpp's vocabulary of that name
(:func:`codetune.llama_cpp.tokenizer_folder`)."""

TOKENIZER_FORMAT_VERSION = 1
SENTINELS_KEY = "codetune_fim_sentinels"
"""Key of the run's sentinel set in the tokenizer's ``init_kwargs`` (and so its ``tokenizer_config.json``)."""


@dataclass(frozen=True)
class FIMSentinels:
    """The four strings that mark a fill-in-the-middle document."""

    prefix: str
    """Starts the prefix (Code Llama ``<PRE>``)."""
    suffix: str
    """Starts the suffix (Code Llama ``<SUF>``)."""
    middle: str
    """Starts the middle, the part the model learns to infill (Code Llama ``<MID>``)."""
    end: str
    """Ends the middle; generation of an infill stops here (Code Llama ``<EOT>``)."""
    pad: str | None = None
    """Optional FIM pad token (StarCoder ``<fim_pad>``); never required."""

    def tokens(self) -> list[str]:
        return [t for t in (self.prefix, self.suffix, self.middle, self.end, self.pad) if t is not None]


SENTINEL_SETS: dict[str, FIMSentinels] = {
    # Code Llama (Rozière et al. 2023): <EOT> ends the middle, distinct from </s>.
    "codellama": FIMSentinels(prefix="<PRE>", suffix="<SUF>", middle="<MID>", end="<EOT>"),
    # The same four as Code Llama's released SentencePiece vocabulary spells them (codellama/CodeLlama-*-hf):
    # the trained rows are reused instead of new ones being added.
    "codellama-hf": FIMSentinels(prefix="▁<PRE>", suffix="▁<SUF>", middle="▁<MID>", end="▁<EOT>"),
    # StarCoder / StarCoder2 / SantaCoder: the document end token doubles as end of middle.
    "starcoder": FIMSentinels(
        prefix="<fim_prefix>",
        suffix="<fim_suffix>",
        middle="<fim_middle>",
        end="<|endoftext|>",
        pad="<fim_pad>",
    ),
    # DeepSeek-Coder (Guo et al. 2024 §3.1): PSM is begin-prefix, hole-suffix, end-middle; the document's
    # end-of-sentence token ends the middle.
    "deepseek-coder": FIMSentinels(
        prefix="<｜fim▁begin｜>", suffix="<｜fim▁hole｜>", middle="<｜fim▁end｜>", end="<｜end▁of▁sentence｜>"
    ),
    # Qwen2.5-Coder (Hui et al. 2024 §3.1): StarCoder's layout with Qwen's spelling; <|endoftext|> ends the middle.
    "qwen2.5-coder": FIMSentinels(
        prefix="<|fim_prefix|>",
        suffix="<|fim_suffix|>",
        middle="<|fim_middle|>",
        end="<|endoftext|>",
        pad="<|fim_pad|>",
    ),
}


DEFAULT_SENTINELS = SENTINEL_SETS["codellama"]
"""Added to tokenizers that carry no known set (the trained BPE, a base without FIM)."""


def resolve_sentinels(sentinels: str | FIMSentinels) -> FIMSentinels:
    """Turn a sentinel-set name (a key of :data:`SENTINEL_SETS`) or a custom set into a :class:`FIMSentinels`."""
    if isinstance(sentinels, FIMSentinels):
        return sentinels
    if isinstance(sentinels, dict):
        return FIMSentinels(**sentinels)
    try:
        return SENTINEL_SETS[sentinels]
    except KeyError:
        raise ValueError(
            f"unknown FIM sentinel set {sentinels!r}: use one of {sorted(SENTINEL_SETS)} "
            "or give prefix/suffix/middle/end strings"
        ) from None


@dataclass
class TrainTokenizer:
    """Train a byte-level BPE tokenizer on a code corpus (no download), cached on disk."""

    corpus: str = "@stdlib"
    """Directory of code files to train on; ``@stdlib`` is the Python standard library sources."""
    include: list[str] | None = None
    """Glob patterns of files to train on (default: ``**/*.py``)."""
    vocab_size: int = 4096
    """Vocabulary size including special tokens; a multiple of 64 keeps the embedding matmul aligned."""
    max_files: int | None = 400
    """Train on at most this many files (deterministic subset) to keep training fast."""


@dataclass
class TokenizerSpec:
    """Where the tokenizer comes from and which FIM sentinels it carries."""

    name_or_path: str | None = None
    """A Hugging Face tokenizer: local folder or Hub id; ``llama.cpp:NAME`` is llama.cpp's vocabulary of a real
    family (``starcoder``, ``deepseek-coder``, ``qwen2.5-coder``; see docs/tokenizers.md), fetched once. Leave
    empty to train one with ``train``."""
    train: TrainTokenizer | None = None
    """Train a byte-level BPE tokenizer instead of loading one."""
    sentinels: str | FIMSentinels | None = None
    """FIM sentinel set: ``codellama``, ``codellama-hf`` (Code Llama's released vocabulary, ``▁<PRE>`` ...),
    ``starcoder``, ``deepseek-coder``, ``qwen2.5-coder`` or custom strings. ``None``: the set a pretrained tokenizer already carries (its trained
    rows are reused), else ``codellama`` (added as new tokens)."""
    add_missing_sentinels: bool = True
    """Add sentinels the tokenizer lacks as special tokens (the model then grows new embedding rows)."""
    trust_remote_code: bool = False
    """Allow tokenizer code from the checkpoint's repository to run. Off unless the recipe turns it on."""
    cache_dir: str | None = None
    """Where trained tokenizers are cached (default ``$CODETUNE_CACHE`` or ``~/.cache/codetune``)."""


def build_tokenizer(spec: TokenizerSpec):
    """Load or train the tokenizer described by ``spec`` and make sure it carries the FIM sentinels.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``eos_token`` and ``pad_token`` set.
    """
    if (spec.name_or_path is None) == (spec.train is None):
        raise ValueError(
            "tokenizer: give exactly one of `name_or_path` (load) or `train` (train a BPE tokenizer)"
        )
    if spec.name_or_path is not None:
        tokenizer = _load_pretrained(spec)
        if spec.sentinels is None:
            sentinels = fim_sentinels(tokenizer) or DEFAULT_SENTINELS
        else:
            sentinels = resolve_sentinels(spec.sentinels)
            _check_not_another_set(tokenizer, sentinels)
    else:
        sentinels = resolve_sentinels(spec.sentinels or DEFAULT_SENTINELS)
        tokenizer = _trained_tokenizer(spec.train, sentinels, cache_root(spec.cache_dir))
    ensure_sentinels(tokenizer, sentinels, add=spec.add_missing_sentinels)
    record_sentinels(tokenizer, sentinels)
    # Released tokenizers carry some of these as plain added tokens (DeepSeek-Coder's and Qwen2.5-Coder's FIM
    # tokens): literal text in a user's code would then match them, and decoding would not skip them.
    repo = repo_tokens(tokenizer)
    make_special(tokenizer, sentinels.tokens() + ([repo.repo_name, repo.file_sep] if repo else []))
    if tokenizer.pad_token is None:
        # Packing pads only the final row; its labels are -100, so any id would do. A pretrained base keeps its
        # vocabulary (a new row would have to be trained or left random): its FIM pad (StarCoder2 <fim_pad>),
        # else its end-of-text. A trained tokenizer has its own <pad>.
        pad = sentinels.pad if sentinels.pad in tokenizer.get_vocab() else None
        if spec.name_or_path is not None:
            tokenizer.pad_token = pad or tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def ensure_sentinels(tokenizer, sentinels: FIMSentinels, add: bool = True) -> list[str]:
    """Make every sentinel a single special token; return the ones that had to be added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in sentinels.tokens() if t not in vocab]
    if missing and not add:
        raise ValueError(
            f"tokenizer lacks FIM sentinels {missing}: set `tokenizer.add_missing_sentinels: true` "
            "(the model grows trainable rows for them) or pick the sentinel set the model was trained with"
        )
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    return missing


def make_special(tokenizer, tokens: Sequence[str]) -> list[str]:
    """Register each of ``tokens`` the tokenizer has as a special token at its existing id; return those changed."""
    vocab = tokenizer.get_vocab()
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    changed = [t for t in tokens if t in vocab and t not in special]
    if not changed:
        return []
    from tokenizers import AddedToken

    before = [vocab[t] for t in changed]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in changed]},
        replace_extra_special_tokens=False,
    )
    after = tokenizer.convert_tokens_to_ids(changed)
    if after != before:  # an added token takes the id the vocabulary has for its text; anything else is a bug
        raise ValueError(f"registering {changed} as special tokens moved their ids {before} -> {after}")
    return changed


def backend_copy(tokenizer, text_only: bool = False):
    """A private copy of ``tokenizer``'s ``tokenizers`` backend without truncation or padding, so changing its
    settings never changes the caller's tokenizer. ``text_only`` turns special-token matching off: a literal
    ``<PRE>`` or ``<|endoftext|>`` in a user's code stays text and cannot forge a sentinel."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    copy = type(backend).from_str(backend.to_str())
    copy.encode_special_tokens = text_only
    copy.no_truncation()
    copy.no_padding()
    return copy


CONTINUATION_MARK = "\ue000"
"""A character no BPE merge touches: prepended before encoding text that continues other text, then dropped, so
SentencePiece-style tokenizers do not add their dummy leading space (Code Llama's ``encode_infilling`` prepends
"☺" for the same reason)."""


def adds_dummy_prefix(backend) -> bool:
    """Whether ``backend`` (a ``tokenizers.Tokenizer``) encodes text at the start differently from the same text
    after other text: a Metaspace pre-tokenizer, or a normaliser prepending "▁" (SentencePiece, Code Llama)."""
    return continuation_ids(backend, "a", force=True) != backend.encode("a", add_special_tokens=False).ids


def continuation_ids(backend, text: str, force: bool = False) -> list[int]:
    """Ids of ``text`` as a continuation of other text: without the dummy leading space a SentencePiece-style
    backend adds at the start (``force``: always encode behind the marker; otherwise only when ``text`` would
    change). Byte-level BPE ids are those of a plain encode."""
    if not text:
        return []
    enc = backend.encode(CONTINUATION_MARK + text, add_special_tokens=False)
    keep = [i for i, (start, _) in enumerate(enc.offsets) if start >= len(CONTINUATION_MARK)]
    if not keep or any(enc.offsets[i][1] > len(CONTINUATION_MARK) for i in range(keep[0])):
        raise ValueError(
            "cannot encode text without the tokenizer's dummy leading space: the marker "
            f"{CONTINUATION_MARK!r} merged with the text; this tokenizer needs a different marker"
        )
    return enc.ids[keep[0] :]


def added_bos(tokenizer) -> int | None:
    """The BOS id when ``tokenizer`` itself puts one before encoded text (Llama, Code Llama), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return bos if bos is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos] else None


def record_sentinels(tokenizer, sentinels: FIMSentinels) -> None:
    """Write the run's sentinel set into the tokenizer (saved with it in ``tokenizer_config.json``)."""
    tokenizer.init_kwargs[SENTINELS_KEY] = asdict(sentinels)


def fim_sentinels(tokenizer) -> FIMSentinels | None:
    """The FIM sentinel set of ``tokenizer``: the one codetune recorded in it, else the known set it carries.

    When a foreign tokenizer carries several known sets in full, the one added last (highest token ids) wins:
    codetune adds the sentinels it trains with after the base's own vocabulary. ``None`` when it carries none.
    """
    vocab = tokenizer.get_vocab()
    recorded = getattr(tokenizer, "init_kwargs", {}).get(SENTINELS_KEY)
    if recorded:
        sentinels = FIMSentinels(**recorded)
        if all(t in vocab for t in sentinels.tokens()):
            return sentinels
    return newest_carried_set(vocab)


def newest_carried_set(vocab: dict[str, int]) -> FIMSentinels | None:
    """The known sentinel set ``vocab`` carries in full; of several, the one added last (highest token ids)."""
    carried = carried_sentinel_sets(vocab)
    if not carried:
        return None
    return SENTINEL_SETS[max(carried, key=lambda n: min(vocab[t] for t in SENTINEL_SETS[n].tokens()))]


def carried_sentinel_sets(vocab: dict[str, int]) -> list[str]:
    """Names of the known sentinel sets whose every token is in ``vocab``."""
    return [name for name, s in SENTINEL_SETS.items() if all(t in vocab for t in s.tokens())]


def _check_not_another_set(tokenizer, sentinels: FIMSentinels) -> None:
    """Refuse a recipe's sentinel set that a pretrained tokenizer lacks while it carries another known set in full:
    adding fresh sentinels next to trained ones would silently throw away the base's infilling ability."""
    vocab = tokenizer.get_vocab()
    # Only the FIM-specific three: an end token such as StarCoder's <|endoftext|> is often the tokenizer's EOS too.
    if any(t in vocab for t in (sentinels.prefix, sentinels.suffix, sentinels.middle)):
        return
    for name in carried_sentinel_sets(vocab):
        known = SENTINEL_SETS[name]
        if known != sentinels:
            raise ValueError(
                f"the tokenizer already carries the `{name}` FIM sentinels ({' '.join(known.tokens())}) but the "
                f"recipe asks for {' '.join(sentinels.tokens())}: set `sentinels: {name}` in data.init_args.tokenizer "
                "(or leave it unset) to reuse the trained ones"
            )


def _load_pretrained(spec: TokenizerSpec):
    from transformers import AutoTokenizer

    if spec.name_or_path.startswith(LLAMA_CPP_PREFIX):
        # A real family's vocabulary without the Hub: llama.cpp's pinned vocabulary files (fetched once).
        return AutoTokenizer.from_pretrained(tokenizer_folder(spec.name_or_path[len(LLAMA_CPP_PREFIX) :]))
    path = Path(spec.name_or_path).expanduser()
    if spec.name_or_path.startswith((".", "/", "~")) and not path.exists():
        raise FileNotFoundError(f"tokenizer.name_or_path: {spec.name_or_path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(
        str(path) if path.exists() else spec.name_or_path, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {spec.name_or_path} has no eos_token: packing needs one to end documents"
        )
    return tokenizer


def _trained_tokenizer(train: TrainTokenizer, sentinels: FIMSentinels, root: Path):
    from transformers import PreTrainedTokenizerFast

    source = CodeFiles(path=train.corpus, include=train.include or ["**/*.py"], max_files=train.max_files)
    special = ["<|endoftext|>", "<pad>", *[t for t in sentinels.tokens() if t != "<|endoftext|>"]]
    key = hashlib.sha256(
        json.dumps(
            {
                "v": TOKENIZER_FORMAT_VERSION,
                "train": asdict(train),
                "special": special,
                "root": str(Path(source.root).resolve()),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    folder = root / "tokenizers" / key
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level: every UTF-8 string round-trips, so FIM splits on characters always re-encode exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=train.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((doc.text for doc in source.documents()), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=special[2:],
    )
    with atomic_folder(folder) as tmp:
        tokenizer.save_pretrained(tmp)
    log.info("trained a %d-token BPE tokenizer on %s, cached in %s", len(tokenizer), train.corpus, folder)
    return tokenizer
