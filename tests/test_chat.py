"""Instruction data: conversations parse, round-trip through curation text, and only assistant turns train."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codetune.data.batch import IGNORE_INDEX
from codetune.data.chat import (
    NAMED_TEMPLATES,
    ChatEncoder,
    ChatFiles,
    conversation_messages,
    conversation_text,
)

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Write `double(n)`."},
    {"role": "assistant", "content": "def double(n):\n    return 2 * n"},
    {"role": "user", "content": "Now for lists?"},
    {"role": "assistant", "content": "def double_all(xs):\n    return [2 * x for x in xs]"},
]

contents = st.text(st.characters(blacklist_characters="\x1e\x1f", blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), contents), min_size=1, max_size=6))
def test_conversation_text_round_trips(turns):
    messages = [{"role": r, "content": c} for r, c in turns]
    assert conversation_messages(conversation_text(messages)) == messages


def labelled_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("template", sorted(NAMED_TEMPLATES))
def test_only_assistant_turns_carry_labels(tokenizer, template):
    encoder = ChatEncoder(tokenizer, template)
    ids, labels = encoder.encode(MULTI_TURN)
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    runs = labelled_runs(labels)
    assistants = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    assert len(runs) == len(assistants)  # one trained stretch per assistant turn
    rendered = encoder.render(MULTI_TURN)
    for (a, b), content in zip(runs, assistants, strict=True):
        text = tokenizer.decode(ids[a:b], skip_special_tokens=False)
        # The answer and the markup that closes the turn, and nothing from the user's turns.
        assert text.startswith(content)
        assert text[len(content) :] in rendered and "Now for lists" not in text
    trained = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    for m in MULTI_TURN:
        assert (m["content"] in trained) == (m["role"] == "assistant")
    # All tokens together are the rendered conversation, exactly.
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered


def test_codetune_template_ends_answers_with_end_of_text(tokenizer):
    ids, labels = ChatEncoder(tokenizer, "codetune").encode(MULTI_TURN)
    ends = [b for _, b in labelled_runs(labels)]
    assert all(ids[b - 1] == tokenizer.eos_token_id for b in ends)  # the model learns to stop


def test_generation_prompt_is_the_training_prefix(tokenizer):
    encoder = ChatEncoder(tokenizer, "codetune")
    ids, labels = encoder.encode(MULTI_TURN)
    prompt = encoder.encode_prompt(MULTI_TURN[:-1])
    assert ids[: len(prompt)] == prompt
    assert labels[len(prompt)] != IGNORE_INDEX  # the answer starts right where the prompt ends
    assert all(label == IGNORE_INDEX for label in labels[len(prompt) - 1 : len(prompt)])


def test_literal_sentinels_in_user_text_stay_text(tokenizer):
    encoder = ChatEncoder(tokenizer, "codetune")
    messages = [
        {"role": "user", "content": "What does `<PRE>` mean in `<|endoftext|>`?"},
        {"role": "assistant", "content": "It is a marker: <MID>"},
    ]
    ids, _ = encoder.encode(messages)
    specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<PRE>", "<MID>")}
    assert not specials & set(ids)
    assert ids.count(tokenizer.eos_token_id) == 1  # only the template's own end of the answer


def test_tokenizer_template_is_used_and_its_absence_explained(tokenizer):
    from copy import deepcopy

    with_template = deepcopy(tokenizer)
    with_template.chat_template = NAMED_TEMPLATES["chatml"]
    ids, labels = ChatEncoder(with_template, "tokenizer").encode(MULTI_TURN[1:3])
    assert "<|im_start|>assistant" in with_template.decode(ids)
    assert labelled_runs(labels)
    with pytest.raises(ValueError, match="has no chat template.*codetune"):
        ChatEncoder(tokenizer, "tokenizer")
    with pytest.raises(ValueError, match="not a known template"):
        ChatEncoder(tokenizer, "alpaca-ish")


def test_template_that_is_not_prefix_stable_is_refused(tokenizer):
    # Prints the number of turns first, so a shorter conversation is not a prefix of a longer one.
    unstable = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="not prefix-stable"):
        ChatEncoder(tokenizer, unstable).encode(MULTI_TURN)


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_messages_and_prompt_response_records_are_read(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            json.dumps({"messages": MULTI_TURN}),
            json.dumps({"prompt": "Hi?", "response": "Hello.", "system": "Be kind."}),
            json.dumps({"prompt": "No system", "response": "Fine."}),
        ],
    )
    docs = list(ChatFiles(str(path), name="chat").documents())
    assert [d.doc_id for d in docs] == ["chat.jsonl:1", "chat.jsonl:2", "chat.jsonl:3"]
    assert conversation_messages(docs[0].text) == MULTI_TURN
    assert conversation_messages(docs[1].text) == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert [m["role"] for m in conversation_messages(docs[2].text)] == ["user", "assistant"]


BAD_LINES = [
    ("{not json", "malformed JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "no answer"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role 'robot'"),
    (json.dumps({"question": "q", "answer": "a"}), "neither 'messages' nor"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_line_raises_with_path_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps({"prompt": "q", "response": "a"}), line])
    with pytest.raises(ValueError, match=rf"chat\.jsonl:2: .*{message}"):
        list(ChatFiles(str(path)).documents())


def test_bad_lines_are_skipped_and_counted_when_asked(tmp_path):
    good = json.dumps({"prompt": "q", "response": "a"})
    path = write_jsonl(tmp_path / "chat.jsonl", [good] + [line for line, _ in BAD_LINES] + [good])
    source = ChatFiles(str(path), on_error="skip")
    assert len(list(source.documents())) == 2
    assert source.skipped.counts == {"malformed_json": 1, "bad_conversation": 3}
    assert f"{path}:2" in source.skipped.examples["malformed_json"]


CONVERSATIONS = [
    MULTI_TURN,
    [
        {"role": "user", "content": "Please write a function."},
        {"role": "assistant", "content": "def f():\n    pass"},
    ],
    [{"role": "user", "content": "sum 1..10"}, {"role": "assistant", "content": " 55 (a leading space)"}],
]


@pytest.mark.parametrize(
    ("kind", "template"),
    # Not StarCoder2 with ChatML: its markers are text there, and one call merges "." with the "<" after it,
    # across the content/markup cut the encoder keeps so that content never matches special tokens.
    [
        ("sentencepiece", "codetune"),
        ("sentencepiece", "chatml"),
        ("byte-level", "codetune"),
        ("starcoder2", "codetune"),
    ],
)
def test_a_conversation_tokenizes_like_its_rendered_text(request, kind, template):
    # Defect: each piece was encoded on its own, so SentencePiece put a dummy space at every piece boundary
    # ("\n\n### Instruction\n Please ..."), and every assistant turn started with one.
    if kind == "sentencepiece":
        tokenizer = request.getfixturevalue("codellama_tokenizer")
    elif kind == "byte-level":
        tokenizer = request.getfixturevalue("tokenizer")
    else:
        from tests.vocabularies import family_tokenizer

        tokenizer = family_tokenizer("starcoder2")
    encoder = ChatEncoder(tokenizer, template)
    for messages in CONVERSATIONS:
        rendered = encoder.render(messages)
        ids, labels = encoder.encode(messages)
        # The oracle: the rendered text in one call (its markup has no literal special-token text).
        assert ids == tokenizer(rendered)["input_ids"], rendered
        body = ids[1:] if ids[:1] == [tokenizer.bos_token_id] else ids
        assert tokenizer.decode(body, skip_special_tokens=False) == rendered
