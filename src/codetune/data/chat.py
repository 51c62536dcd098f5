"""Instruction data: conversations from JSONL, laid out with a chat template, loss on assistant turns only.

A record is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` (multi-turn; roles ``system``,
``user``, ``assistant``) or a ``{"prompt": ..., "response": ...}`` pair (optional ``system``). The conversation
is rendered with a chat template (the tokenizer's own, a named one shipped here, or a Jinja string) and tokenized
piece by piece: message contents with special-token matching off (a literal ``<PRE>`` in a user's code stays
text), template markup with it on (so ``eos_token`` is the end-of-text id). Labels are -100 everywhere except
each assistant turn's content and the markup that closes it (e.g. the end-of-text token): the model learns to
answer and to stop, never to write the user's turns (Ouyang et al. 2022; Code Llama - Instruct).

Curation (dedup, decontamination, redaction) works on text, so a conversation travels through it as one
string in a reversible plain form (:func:`conversation_text` / :func:`conversation_messages`) whose words are
the contents' own words.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from codetune.data.batch import IGNORE_INDEX
from codetune.data.sources import Document, SkipReport, _check_on_error, bad_record, jsonl_records
from codetune.data.tokenizer import added_bos, adds_dummy_prefix, backend_copy, continuation_ids

ROLES = ("system", "user", "assistant")

# Record and unit separators delimit turns; a newline after the role keeps the first content word separate
# for decontamination's whitespace split.
_TURN, _ROLE_END = "\x1e", "\x1f"

NAMED_TEMPLATES: dict[str, str] = {
    # Plain-text markers, no new tokens: works with any tokenizer, including our trained BPE. An assistant turn
    # ends with the end-of-text token, so generation stops there.
    "codetune": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{{ '### Instruction\\n' }}{{ m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{{ '\\n\\n### Response\\n' }}{{ m['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\n### Response\\n' }}{% endif %}"
    ),
    # ChatML (OpenAI; Qwen and many open models). The markers are text unless the tokenizer has them as tokens.
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{{ m['content'] }}{{ '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
TOKENIZER_TEMPLATE = "tokenizer"
"""Template name meaning: use the tokenizer's own ``chat_template``."""


# --- conversations as curatable text ----------------------------------------------------------------


def conversation_text(messages: Sequence[dict[str, str]]) -> str:
    """A conversation as one string that curation can hash, search and redact, and that round-trips."""
    return "".join(f"{_TURN}{m['role']}{_ROLE_END}\n{m['content']}\n" for m in messages)


def conversation_messages(text: str) -> list[dict[str, str]]:
    """Inverse of :func:`conversation_text`."""
    if not text.startswith(_TURN):
        raise ValueError("not a conversation text: it must start with a turn separator (U+001E)")
    messages = []
    for turn in text[1:].split(_TURN):
        role, sep, rest = turn.partition(_ROLE_END + "\n")
        if not sep or not rest.endswith("\n"):
            raise ValueError(f"not a conversation text: malformed turn {turn[:40]!r}")
        messages.append({"role": role, "content": rest[:-1]})
    return messages


def check_messages(messages: Any) -> str | None:
    """Why ``messages`` is not a usable conversation, or None if it is."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            return f"message {i} must be an object with string 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}"
        if m["role"] == "system" and i != 0:
            return f"message {i}: a system message may only come first"
        if _TURN in m["content"] or _ROLE_END in m["content"]:
            return f"message {i} contains a U+001E/U+001F control character"
    if not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no assistant turn, so nothing would be trained"
    return None


# --- the source --------------------------------------------------------------------------------------


@dataclass
class ChatFiles:
    """Conversations in JSONL (``.jsonl`` / ``.jsonl.gz`` file, folder or glob), one per line.

    Each line holds ``messages`` (multi-turn) or a ``prompt`` / ``response`` pair. Bad lines (malformed JSON,
    neither shape, unknown role, no assistant turn) raise naming ``path:line``, or with ``on_error: skip`` are
    skipped and counted in ``skipped``.
    """

    path: str
    """A JSONL file, a folder of them, or a glob."""
    name: str = "chat"
    """Source name used in reports, previews and mixing weights."""
    messages_field: str = "messages"
    """Key of the list of ``{role, content}`` turns."""
    prompt_field: str = "prompt"
    """Key of the user prompt, when a record has no ``messages``."""
    response_field: str = "response"
    """Key of the assistant response, when a record has no ``messages``."""
    system_field: str | None = "system"
    """Key of an optional system message for prompt/response records; None ignores it."""
    id_field: str | None = None
    """Key holding a stable id; None uses ``file:line``."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad line: raise with ``path:line``, or skip and count it."""
    skipped: SkipReport = field(default_factory=SkipReport, init=False, repr=False, compare=False)
    """Filled while ``documents()`` runs; reset at the start of each pass."""

    def __post_init__(self) -> None:
        _check_on_error(f"ChatFiles {self.name!r}", self.on_error)

    def messages_of(self, record: Any) -> tuple[list[dict[str, str]] | None, str]:
        """The record's conversation, or None and why it is unusable."""
        if not isinstance(record, dict):
            return None, f"expected a JSON object, got {type(record).__name__}"
        if self.messages_field in record:
            raw = record[self.messages_field]
            problem = check_messages(raw)
            if problem:
                return None, problem
            return [{"role": m["role"], "content": m["content"]} for m in raw], ""
        prompt, response = record.get(self.prompt_field), record.get(self.response_field)
        if not (isinstance(prompt, str) and isinstance(response, str)):
            return None, (
                f"neither {self.messages_field!r} nor string {self.prompt_field!r} and {self.response_field!r} fields"
            )
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        system = record.get(self.system_field) if self.system_field else None
        if isinstance(system, str) and system:
            messages.insert(0, {"role": "system", "content": system})
        problem = check_messages(messages)
        return (None, problem) if problem else (messages, "")

    def documents(self) -> Iterator[Document]:
        """One document per usable line; its text is :func:`conversation_text` of the messages."""
        self.skipped.clear()
        owner = f"ChatFiles {self.name!r}"
        yielded = 0
        for file, display, lineno, where, record in jsonl_records(self, owner):
            messages, problem = self.messages_of(record)
            if messages is None:
                self._bad("bad_conversation", where, problem)
                continue
            if self.id_field is not None and record.get(self.id_field) is None:
                self._bad("missing_id", where, f"id field {self.id_field!r} is missing")
                continue
            doc_id = str(record[self.id_field]) if self.id_field else f"{display}:{lineno}"
            yielded += 1
            yield Document(
                conversation_text(messages), doc_id, self.name, {"path": str(file), "line": lineno}
            )
        if yielded == 0:
            raise ValueError(
                f"{owner}: no usable conversations in {self.path!r}; skipped: {self.skipped.summary()}"
            )

    def _bad(self, reason: str, where: str, message: str) -> None:
        bad_record(self, reason, where, message)


# --- templates and masking ---------------------------------------------------------------------------


def resolve_template(template: str, tokenizer: Any) -> str:
    """The Jinja source of ``template``: a name in :data:`NAMED_TEMPLATES`, ``"tokenizer"``, or Jinja itself."""
    if template == TOKENIZER_TEMPLATE:
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise ValueError(
                "data.chat_template is 'tokenizer' but the tokenizer has no chat template; use a named template "
                f"({', '.join(NAMED_TEMPLATES)}) or give a Jinja template string"
            )
        return own if isinstance(own, str) else own.get("default", next(iter(own.values())))
    if template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return template
    raise ValueError(
        f"data.chat_template {template!r} is not a known template ({', '.join(NAMED_TEMPLATES)}, "
        f"{TOKENIZER_TEMPLATE!r}) nor a Jinja string"
    )


class ChatEncoder:
    """Renders conversations with one chat template and tokenizes them with per-turn loss masks.

    Training (:meth:`encode`) and inference (:meth:`encode_prompt`) share the piecewise tokenization, so a
    prompt at evaluation time is exactly the token prefix the model was trained on.
    """

    def __init__(self, tokenizer: Any, template: str = "codetune") -> None:
        self.tokenizer = tokenizer
        self.template_name = template
        self.template = resolve_template(template, tokenizer)
        # `text` never matches special tokens; `markup` does (the template's own end-of-text token).
        self._markup = backend_copy(tokenizer)
        self._text = backend_copy(tokenizer, text_only=True)
        self.bos_id = added_bos(tokenizer)
        # SentencePiece-style tokenizers put a dummy space before every separately encoded piece: every piece
        # but the first is encoded as a continuation, so the ids are those of the rendered text.
        self._continues = adds_dummy_prefix(self._text)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as the template lays it out (text, not tokens)."""
        return self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def _generation_prompt(self) -> str:
        base = [{"role": "user", "content": "x"}]
        with_prompt = self.render(base, add_generation_prompt=True)
        return with_prompt[len(self.render(base)) :]

    def _pieces(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool
    ) -> list[tuple[str, bool, bool]]:
        """``(text, is_content, trained)`` pieces whose concatenation is the rendered conversation."""
        full = self.render(messages, add_generation_prompt)
        trained: list[tuple[int, int]] = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else self._generation_prompt()
            through = self.render(messages[: i + 1])
            if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
                raise ValueError(
                    f"chat template {self.template_name!r} is not prefix-stable (rendering the first turns is not a "
                    "prefix of rendering them all), so assistant turns cannot be masked per turn; use another template"
                )
            trained.append((len(before), len(through)))
        contents: list[tuple[int, int]] = []
        cursor = 0
        for m in messages:
            if not m["content"]:
                continue
            at = full.find(m["content"], cursor)
            if at < 0:  # the template rewrote the content (e.g. trimmed it): treat that turn as markup
                continue
            contents.append((at, at + len(m["content"])))
            cursor = at + len(m["content"])
        cuts = sorted({0, len(full), *(p for span in trained + contents for p in span)})
        pieces = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            is_content = any(s <= a and b <= e for s, e in contents)
            is_trained = any(s <= a and b <= e for s, e in trained)
            pieces.append((full[a:b], is_content, is_trained))
        return pieces

    def _ids(self, pieces: list[tuple[str, bool, bool]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for k, (text, is_content, trained) in enumerate(pieces):
            backend = self._text if is_content else self._markup
            if k and self._continues:
                piece = continuation_ids(backend, text)
            else:
                piece = backend.encode(text, add_special_tokens=False).ids
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
            labels.insert(0, IGNORE_INDEX)
        return ids, labels

    def encode(self, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and its labels (-100 outside assistant turns)."""
        problem = check_messages(list(messages))
        if problem:
            raise ValueError(f"cannot encode conversation: {problem}")
        return self._ids(self._pieces(messages, add_generation_prompt=False))

    def encode_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a prompt ending where the assistant's answer starts (for generation)."""
        return self._ids(self._pieces(messages, add_generation_prompt=True))[0]

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """:meth:`encode` of a conversation in :func:`conversation_text` form (what curation passes on)."""
        return self.encode(conversation_messages(text))


__all__ = [
    "NAMED_TEMPLATES",
    "ChatEncoder",
    "ChatFiles",
    "check_messages",
    "conversation_messages",
    "conversation_text",
    "resolve_template",
]
