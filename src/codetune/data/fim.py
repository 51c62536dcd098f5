"""Fill-in-the-middle (FIM): split a document into prefix/middle/suffix and lay it out with sentinels.

Follows Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle" (FIM) and
Rozière et al. 2023, "Code Llama" §2.3: a character-level split at two uniform cut points, applied with
probability ``fim_rate``; of the transformed documents a share ``spm_rate`` uses the suffix-prefix-middle
layout, the rest prefix-suffix-middle::

    PSM  <PRE> prefix <SUF> suffix <MID> middle <EOT>
    SPM  <PRE> <SUF> suffix <MID> prefix middle <EOT>      (Bavarian et al. App. D, variant 2; Code Llama)

(the spaces above only separate the parts; no space is inserted between a sentinel and the text).

Every random choice is derived from a stable hash of ``(seed, source, per-source document ordinal[, chunk])``,
so the same document gets the same split on every worker, rank, epoch order and resume. The same module
formats inference prompts (:func:`format_infill_prompt`, :meth:`FIMTransform.encode_infill_prompt`) so
evaluation sees exactly the layout training used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from codetune.data.git import language_of
from codetune.data.repository import (
    BODY,
    Piece,
    RepoTokens,
    encode_pieces,
    file_pieces,
    header_pieces,
    layout_pieces,
    start_pieces,
)
from codetune.data.tokenizer import (
    DEFAULT_SENTINELS,
    FIMSentinels,
    added_bos,
    backend_copy,
    continuation_ids,
    fim_sentinels,
    resolve_sentinels,
)

FIMMode = Literal["psm", "spm"]


def _marker(path: str) -> str:
    return language_of(path)[1]


_TWO_64 = 1 << 64


@dataclass
class FIMConfig:
    """Fill-in-the-middle settings for a code source (Code Llama defaults)."""

    fim_rate: float = 0.9
    """Probability that a document (or, at context level, a fragment) is FIM-transformed."""
    spm_rate: float = 0.5
    """Share of FIM-transformed documents laid out suffix-prefix-middle (the rest prefix-suffix-middle)."""
    level: Literal["document", "context"] = "document"
    """``document``: transform whole documents before packing; documents cut across rows stay causal (Code Llama).
    ``context``: transform each document fragment after it is cut to fit a row (Bavarian et al. §3.2)."""
    max_middle_chars: int | None = None
    """Cap on the middle's length in characters; a longer drawn middle is clipped to a window placed uniformly
    inside it (the rest goes to prefix and suffix). ``None``: no cap."""
    seed: int = 0
    """Seed of the per-document draws; change it to get different splits of the same corpus."""

    def __post_init__(self) -> None:
        for name in ("fim_rate", "spm_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fim.{name} must be in [0, 1], got {value}")
        if self.level not in ("document", "context"):
            raise ValueError(f"fim.level must be 'document' or 'context', got {self.level!r}")
        if self.max_middle_chars is not None and self.max_middle_chars < 1:
            raise ValueError(f"fim.max_middle_chars must be >= 1 or null, got {self.max_middle_chars}")
        if not isinstance(self.seed, int):
            raise ValueError(f"fim.seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class FIMSplit:
    """A document cut into three parts, and the layout it is trained in."""

    prefix: str
    middle: str
    suffix: str
    mode: FIMMode

    def original(self) -> str:
        return self.prefix + self.middle + self.suffix


@dataclass(frozen=True)
class FIMDraw:
    """The random choices for one document: whether and how to transform it, independent of its text."""

    mode: FIMMode | None
    """``None``: leave the document causal."""
    cut_a: int
    cut_b: int
    window: int
    """Uniform 64-bit integers; scaled to the text length in :meth:`split`."""

    def split(self, text: str, max_middle_chars: int | None = None) -> FIMSplit:
        """Cut ``text`` at two uniform points in ``[0, len(text)]`` (code points, so never inside a character)."""
        if self.mode is None:
            raise ValueError("this draw leaves the document causal; check draw.mode before splitting")
        n = len(text)
        # Integer scaling of a 64-bit uniform: exact, no float rounding at large n.
        a, b = sorted(((self.cut_a * (n + 1)) >> 64, (self.cut_b * (n + 1)) >> 64))
        if max_middle_chars is not None and b - a > max_middle_chars:
            a += (self.window * (b - a - max_middle_chars + 1)) >> 64
            b = a + max_middle_chars
        return FIMSplit(prefix=text[:a], middle=text[a:b], suffix=text[b:], mode=self.mode)


def draw(config: FIMConfig, source: str, ordinal: int, chunk: int | None = None) -> FIMDraw:
    """The draw for document ``ordinal`` of ``source`` (and fragment ``chunk`` at context level).

    blake2b of a canonical key, not Python's per-process salted ``hash``, so every process agrees.
    """
    key = json.dumps([config.seed, source, ordinal, chunk], separators=(",", ":")).encode()
    digest = hashlib.blake2b(key, digest_size=40).digest()
    u = [int.from_bytes(digest[i : i + 8], "little") for i in range(0, 40, 8)]
    mode: FIMMode | None = None
    if u[0] < config.fim_rate * _TWO_64:
        mode = "spm" if u[1] < config.spm_rate * _TWO_64 else "psm"
    return FIMDraw(mode=mode, cut_a=u[2], cut_b=u[3], window=u[4])


def draw_file(config: FIMConfig, source: str, ordinal: int, files: int) -> int:
    """Which of a repository document's ``files`` repository-level FIM transforms (uniform, stable like :func:`draw`)."""
    key = json.dumps([config.seed, source, ordinal, "file"], separators=(",", ":")).encode()
    return (int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") * files) >> 64


def format_fim_text(split: FIMSplit, sentinels: str | FIMSentinels = "codellama") -> str:
    """The training text of a split document (what the model reads, before tokenization)."""
    s = resolve_sentinels(sentinels)
    return format_infill_prompt(split.prefix, split.suffix, split.mode, s) + split.middle + s.end


def format_infill_prompt(
    prefix: str, suffix: str, mode: FIMMode = "psm", sentinels: str | FIMSentinels = "codellama"
) -> str:
    """The inference prompt for infilling between ``prefix`` and ``suffix``, laid out exactly as in training.

    The model continues it with the middle and stops at the end sentinel.
    """
    s = resolve_sentinels(sentinels)
    if mode == "psm":
        return s.prefix + prefix + s.suffix + suffix + s.middle
    if mode == "spm":  # SPM, Bavarian et al. App. D variant 2: the prefix follows <MID>
        return s.prefix + s.suffix + suffix + s.middle + prefix
    raise ValueError(f"FIM mode must be 'psm' or 'spm', got {mode!r}")


def repository_prompt_pieces(
    repo: str, context: Sequence[tuple[str, str]], path: str, tokens: RepoTokens | None
) -> list[Piece]:
    """What comes before the prefix sentinel in a repository-level infill prompt: the context files
    (``(path, code)``, in the order given: dependencies first) and the header of the file being edited."""
    pieces = start_pieces(repo, tokens)
    for context_path, code in context:
        pieces += file_pieces(repo, context_path, code, tokens, _marker(context_path))
    return pieces + header_pieces(repo, path, tokens, _marker(path))


def format_repository_infill_prompt(
    prefix: str,
    suffix: str,
    mode: FIMMode,
    sentinels: str | FIMSentinels,
    repo: str,
    context: Sequence[tuple[str, str]],
    path: str,
    tokens: RepoTokens | None,
) -> str:
    """The text of a repository-level infill prompt (what :meth:`FIMTransform.encode_repository_infill_prompt`
    encodes, its repository and file tokens written out)."""
    head = "".join(piece for _, piece in repository_prompt_pieces(repo, context, path, tokens))
    return head + format_infill_prompt(prefix, suffix, mode, sentinels)


def unpermute_text(text: str, sentinels: str | FIMSentinels = "codellama") -> str:
    """Recover the original document from its FIM training text (PSM or SPM).

    Assumes the parts themselves contain no sentinel strings; :meth:`FIMTransform.unpermute_ids` has no
    such limit because sentinels are distinct token ids there.
    """
    s = resolve_sentinels(sentinels)
    if not (text.startswith(s.prefix) and text.endswith(s.end)):
        raise ValueError(f"not a FIM text: it must start with {s.prefix!r} and end with {s.end!r}")
    body = text[len(s.prefix) : len(text) - len(s.end)]
    i = body.find(s.suffix)
    j = body.find(s.middle, i + len(s.suffix)) if i >= 0 else -1
    if j < 0:
        raise ValueError(f"not a FIM text: missing {s.suffix!r} or {s.middle!r}")
    # PSM: prefix | suffix | middle; SPM: (empty) | suffix | prefix+middle. Both give prefix+middle+suffix.
    return body[:i] + body[j + len(s.middle) :] + body[i + len(s.suffix) : j]


@dataclass
class FIMEncoded:
    """Token ids of one FIM document, with the infilling target marked."""

    input_ids: list[int]
    middle_mask: list[bool]
    """True on the middle's tokens and the end sentinel: what the model generates at inference."""
    mode: FIMMode


class FIMTransform:
    """Applies a :class:`FIMConfig` with a tokenizer whose FIM sentinels are single special tokens.

    The sentinel set is the tokenizer's own (:func:`codetune.data.tokenizer.fim_sentinels`: the one the run's
    tokenizer records, else the known set it carries) unless ``sentinels`` names one.

    Text pieces are encoded with special-token matching off, so a literal ``<PRE>`` in source code stays
    text and cannot forge a sentinel. For tokenizers that add a dummy leading space (SentencePiece /
    Metaspace), the suffix and middle are encoded without it, as Code Llama does: they continue a line.
    """

    def __init__(
        self, config: FIMConfig, tokenizer: Any, sentinels: str | FIMSentinels | None = None
    ) -> None:
        self.config = config
        # A tokenizer carrying no set is checked against the default one below, and the error says how to add it.
        self.sentinels = (
            resolve_sentinels(sentinels)
            if sentinels is not None
            else fim_sentinels(tokenizer) or DEFAULT_SENTINELS
        )
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._tok = backend_copy(tokenizer, text_only=True)
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        ids = []
        for name in ("prefix", "suffix", "middle", "end"):
            token = getattr(self.sentinels, name)
            token_id = backend.token_to_id(token)
            if token_id is None or token not in added:
                raise ValueError(
                    f"tokenizer has no special token for FIM sentinel {token!r} ({name}); build it with "
                    f"codetune.data.tokenizer.build_tokenizer, or call tokenizer.add_tokens({self.sentinels.tokens()}, "
                    "special_tokens=True) and resize the model embeddings"
                )
            ids.append(token_id)
        self.prefix_id, self.suffix_id, self.middle_id, self.end_id = ids
        self.sentinel_ids = frozenset(ids)
        # Documents get a BOS exactly when the tokenizer itself adds one, so FIM and plain documents agree.
        self.bos_id = added_bos(tokenizer)
        # A dummy-prefix tokenizer (Metaspace, or a normaliser prepending "▁") encodes text at the start
        # differently from the same text after other text.
        self.adds_leading_space = self._marked_ids("a") != self._plain_ids("a")
        marker = self._plain_ids("a")
        self._decode_marker = (marker, self._tok.decode(marker, skip_special_tokens=False))

    # -- encoding -------------------------------------------------------------------------------------------

    def _plain_ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _continuation_ids(self, text: str) -> list[int]:
        """Ids of ``text`` as a continuation: no dummy leading space (Code Llama encodes suffix/middle so)."""
        if not self.adds_leading_space or not text:
            return self._plain_ids(text)
        return self._marked_ids(text)

    def _marked_ids(self, text: str) -> list[int]:
        """Ids of ``text`` encoded behind a marker character, with the marker's tokens dropped."""
        return continuation_ids(self._tok, text, force=True)

    def encode_document(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Plain (causal) ids of a whole document with each token's character span; BOS as the tokenizer adds it.

        The spans let the context-level packer cut documents only between characters.
        """
        enc = self._tok.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), list(enc.offsets)
        if self.bos_id is not None:
            ids.insert(0, self.bos_id)
            offsets.insert(0, (0, 0))
        return ids, offsets

    def encode_split(self, split: FIMSplit) -> FIMEncoded:
        """Token ids of a split document: sentinel ids around the separately encoded parts."""
        head = [] if self.bos_id is None else [self.bos_id]
        prefix = self._plain_ids(split.prefix)
        suffix = self._continuation_ids(split.suffix)
        middle = self._continuation_ids(split.middle) + [self.end_id]
        if split.mode == "psm":
            context = [*head, self.prefix_id, *prefix, self.suffix_id, *suffix, self.middle_id]
        else:  # SPM, Bavarian et al. App. D variant 2 (Code Llama): <PRE> <SUF> suffix <MID> prefix middle
            context = [*head, self.prefix_id, self.suffix_id, *suffix, self.middle_id, *prefix]
        return FIMEncoded(
            input_ids=context + middle,
            middle_mask=[False] * len(context) + [True] * len(middle),
            mode=split.mode,
        )

    def encode_repository(
        self, text: str, layout: Sequence[int], fim_draw: FIMDraw, source: str, ordinal: int
    ) -> FIMEncoded:
        """Repository-level FIM: one file of a repository document (drawn by :func:`draw_file`) is split and laid
        out with the sentinels; the files before it, its header and the files after it stay as they are::

            <repo_name>name <file_sep>a.py\n code_a <file_sep>b.py\n <PRE> prefix <SUF> suffix <MID> middle <EOT>
            <file_sep>c.py\n code_c

        (PSM shown; SPM as in :meth:`encode_split`). Only the middle and the end sentinel are the infilling target.
        """
        pieces = layout_pieces(text, layout)
        bodies = [i for i, (kind, _) in enumerate(pieces) if kind == BODY]
        if not bodies:
            return self.encode_split(self.split(text, fim_draw))
        chosen = bodies[draw_file(self.config, source, ordinal, len(bodies))]
        before, _ = encode_pieces(self._tok, pieces[:chosen])
        after, _ = encode_pieces(self._tok, pieces[chosen + 1 :])
        enc = self.encode_split(self.split(pieces[chosen][1], fim_draw))
        head = [] if self.bos_id is None else [self.bos_id]
        body = enc.input_ids[len(head) :]
        return FIMEncoded(
            input_ids=[*head, *before, *body, *after],
            middle_mask=[False] * (len(head) + len(before))
            + enc.middle_mask[len(head) :]
            + [False] * len(after),
            mode=enc.mode,
        )

    def encode_repository_infill_prompt(
        self,
        prefix: str,
        suffix: str,
        mode: FIMMode,
        repo: str,
        context: Sequence[tuple[str, str]],
        path: str,
        tokens: RepoTokens | None,
    ) -> list[int]:
        """Token ids of a repository-level infill prompt, laid out as :meth:`encode_repository` trains it."""
        before, _ = encode_pieces(self._tok, repository_prompt_pieces(repo, context, path, tokens))
        ids = self.encode_infill_prompt(prefix, suffix, mode)
        head = 0 if self.bos_id is None else 1
        return [*ids[:head], *before, *ids[head:]]

    def unpermute_repository_ids(self, ids: Sequence[int], eos_id: int | None = None) -> str:
        """Recover a repository document's text from its repository-level FIM ids (inverse of
        :meth:`encode_repository`)."""
        ids = list(ids)
        if ids and self.bos_id is not None and ids[0] == self.bos_id:
            ids = ids[1:]
        try:
            start = ids.index(self.prefix_id)
            middle = ids.index(self.middle_id, start)
            end = ids.index(self.end_id, middle)
        except ValueError:
            raise ValueError("not a repository FIM document: a FIM sentinel is missing") from None
        after = ids[end + 1 :]
        if eos_id is not None and after and after[-1] == eos_id:  # the packer's end-of-text
            after = after[:-1]
        before = self._decode(ids[:start], continuation=False)
        return before + self.unpermute_ids(ids[start : end + 1]) + self._decode(after, continuation=False)

    def draw(self, source: str, ordinal: int, chunk: int | None = None) -> FIMDraw:
        return draw(self.config, source, ordinal, chunk)

    def split(self, text: str, fim_draw: FIMDraw) -> FIMSplit:
        return fim_draw.split(text, self.config.max_middle_chars)

    def apply(self, text: str, source: str, ordinal: int, chunk: int | None = None) -> FIMEncoded | None:
        """FIM-encode a document if its draw says so; ``None`` means: keep it causal."""
        d = self.draw(source, ordinal, chunk)
        return None if d.mode is None else self.encode_split(self.split(text, d))

    def encode_infill_prompt(self, prefix: str, suffix: str, mode: FIMMode = "psm") -> list[int]:
        """Token ids of an inference prompt, encoded exactly as :meth:`encode_split` encodes training data."""
        if mode not in ("psm", "spm"):
            raise ValueError(f"FIM mode must be 'psm' or 'spm', got {mode!r}")
        ids = self.encode_split(FIMSplit(prefix=prefix, middle="", suffix=suffix, mode=mode)).input_ids
        return ids[:-1]  # drop the end sentinel: the model writes the middle and then the end sentinel

    # -- decoding -------------------------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int], continuation: bool) -> str:
        if not continuation or not self.adds_leading_space:
            return self._tok.decode(list(ids), skip_special_tokens=False)
        # Decoders strip the dummy space only at the very start: decode behind a known marker, then drop it.
        marker_ids, marker_text = self._decode_marker
        return self._tok.decode([*marker_ids, *ids], skip_special_tokens=False)[len(marker_text) :]

    def decode_middle(self, ids: Sequence[int]) -> str:
        """Text of a generated middle (ids after the prompt), cut at the end sentinel if present."""
        ids = list(ids)
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        return self._decode(ids, continuation=True)

    def unpermute_ids(self, ids: Sequence[int], eos_id: int | None = None) -> str:
        """Recover the original text from a FIM document's ids (a leading BOS and a trailing ``eos_id`` allowed).

        Exact for tokenizers whose decode inverts encode (byte-level BPE); with a dummy-prefix tokenizer a
        leading space of the prefix is lost, as in any SentencePiece round trip.
        """
        ids = list(ids)
        if ids and self.bos_id is not None and ids[0] == self.bos_id:
            ids = ids[1:]
        if eos_id is not None and eos_id != self.end_id and ids and ids[-1] == eos_id:
            ids = ids[:-1]
        if not ids or ids[0] != self.prefix_id or ids[-1] != self.end_id:
            raise ValueError(
                "not a FIM document: ids must start with the prefix sentinel and end with the end one"
            )
        try:
            i = ids.index(self.suffix_id)
            j = ids.index(self.middle_id, i + 1)
        except ValueError:
            raise ValueError("not a FIM document: missing the suffix or middle sentinel") from None
        suffix = self._decode(ids[i + 1 : j], continuation=True)
        if i == 1:  # SPM (or PSM with an empty prefix): prefix and middle follow <MID>
            # Decoded as one plain piece: only its first token can carry a dummy space. (With a dummy-prefix
            # tokenizer an empty prefix followed by a middle starting with a space is indistinguishable here.)
            return self._decode(ids[j + 1 : -1], continuation=False) + suffix
        prefix = self._decode(ids[1:i], continuation=False)
        return prefix + self._decode(ids[j + 1 : -1], continuation=True) + suffix
