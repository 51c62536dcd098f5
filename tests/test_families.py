"""Real code-model families end to end: the FIM sentinel set and repository tokens are read from the tokenizer
(StarCoder2, DeepSeek-Coder, Qwen2.5-Coder from llama.cpp's vocabularies; Code Llama from a SentencePiece model
trained here), and the training layout's prompt part is what Continue sends for that family."""

import pytest

from codetune.data.fim import FIMConfig, FIMSplit, FIMTransform
from codetune.data.repository import REPO_TOKEN_SETS, repo_tokens
from codetune.data.tokenizer import SENTINEL_SETS, TokenizerSpec, build_tokenizer, fim_sentinels
from codetune.exports.editors import continue_prompt
from tests.vocabularies import (
    CODE_LLAMA_FIM,
    FAMILIES,
    FAMILY_IDS,
    family_tokenizer,
    family_transform,
    vocabulary,
)

CASES = [
    ("def add(a, b):\n    ", "\n    return c\n"),
    ("import os\n\n\nclass Walker:\n    def __init__(self, root):\n        self.root = ", "\n"),
    ("", "print('hi')\n"),
    ("x = {'é': 1}  # ", ""),
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_family_set_is_detected_and_its_tokens_are_special_at_their_own_ids(family):
    tokenizer = family_tokenizer(family)
    expected = SENTINEL_SETS[FAMILIES[family][1]]
    ids, size = FAMILY_IDS[family]
    assert fim_sentinels(tokenizer) == expected
    assert len(tokenizer) == size  # the trained rows are reused: nothing added, not even a pad
    special = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert [special[t] for t in expected.tokens()] == ids
    # A literal sentinel in a user's code stays text in training data.
    transform = family_transform(family)
    ids = transform.encode_split(FIMSplit(f"s = '{expected.prefix}'\n", "x", f"# {expected.middle}\n", "psm"))
    assert sum(i in transform.sentinel_ids for i in ids.input_ids) == 4


def test_deepseek_fim_tokens_are_plain_added_tokens_until_the_builder_registers_them():
    from transformers import AutoTokenizer

    # DeepSeek-Coder's released tokenizer (like llama.cpp's vocabulary) has them as non-special added tokens.
    released = AutoTokenizer.from_pretrained(vocabulary("deepseek-coder"))
    added = {t.content: t for t in released.added_tokens_decoder.values()}
    assert not added["<｜fim▁begin｜>"].special
    assert released.convert_tokens_to_ids(["<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"]) == [
        32015,
        32016,
        32017,
    ]
    assert released.bos_token_id == 32013 and released.eos_token_id == 32014
    tokenizer = family_tokenizer("deepseek-coder")
    text = "<｜fim▁begin｜>a"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True) == "a"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_psm_prompt_is_what_continue_sends_for_the_family(family, case):
    tokenizer = family_tokenizer(family)
    prefix, suffix = CASES[case]
    prompt = continue_prompt(FAMILIES[family][2], prefix, suffix)
    # Continue sends the text; the runtime tokenizes it with special tokens parsed (and BOS where the model has one).
    expected = tokenizer(prompt)["input_ids"]
    assert family_transform(family).encode_infill_prompt(prefix, suffix, "psm") == expected


@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_code_llama_psm_prompt_is_code_llamas_own(codellama_tokenizer, sentencepiece_model, case):
    sp, prefix, suffix = sentencepiece_model, *CASES[case]
    assert fim_sentinels(codellama_tokenizer) == SENTINEL_SETS["codellama-hf"]
    pre, suf, mid = (sp.piece_to_id(t) for t in CODE_LLAMA_FIM[:3])

    def encode_infilling(
        text,
    ):  # Code Llama's tokenizer.encode_infilling: "☺" is one piece after the dummy space
        return sp.encode("☺" + text)[2:]

    # codellama/llama/generation.py, infilling_prompt_tokens (PSM), on the SentencePiece model itself.
    reference = [sp.bos_id(), pre, *sp.encode(prefix), suf, *encode_infilling(suffix), mid]
    ids = FIMTransform(FIMConfig(), codellama_tokenizer).encode_infill_prompt(prefix, suffix, "psm")
    assert ids == reference
    # ... which decodes to the text Continue's Code Llama template writes (an empty prefix has no dummy space).
    if prefix:
        assert sp.decode(ids[1:]) == continue_prompt("codellama", prefix, suffix)


def test_the_sentencepiece_fixture_tokenizes_like_sentencepiece(codellama_tokenizer, sentencepiece_model):
    from tests.corpora import stdlib_texts

    for text in stdlib_texts(4, 211).values():
        assert codellama_tokenizer.encode(text, add_special_tokens=False) == sentencepiece_model.encode(text)
    assert codellama_tokenizer.encode("a")[0] == sentencepiece_model.bos_id()


@pytest.mark.parametrize(
    ("family", "name"), [("starcoder2", "starcoder2"), ("qwen2.5-coder", "qwen2.5-coder")]
)
def test_repository_tokens_are_read_from_the_tokenizer_and_special(family, name):
    tokenizer = family_tokenizer(family)
    repo = repo_tokens(tokenizer)
    assert repo == REPO_TOKEN_SETS[name]
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    assert {
        repo.repo_name,
        repo.file_sep,
    } <= special  # Qwen2.5-Coder's released tokenizer has them non-special
    ids = tokenizer.encode(f"{repo.repo_name}octo/demo{repo.file_sep}a.py\nx = 1\n", add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids(repo.file_sep)) == 1


def test_families_without_repository_tokens_have_none(codellama_tokenizer, tokenizer):
    assert repo_tokens(family_tokenizer("deepseek-coder")) is None
    assert repo_tokens(codellama_tokenizer) is None
    assert repo_tokens(tokenizer) is None


def test_a_named_llama_cpp_vocabulary_loads_without_the_hub():
    vocabulary("starcoder")  # or a skip
    tokenizer = build_tokenizer(TokenizerSpec(name_or_path="llama.cpp:starcoder"))
    assert fim_sentinels(tokenizer) == SENTINEL_SETS["starcoder"] and len(tokenizer) == 49152


@pytest.mark.parametrize("kind", ["codellama", "codellama-hf", *FAMILIES])
def test_the_model_cards_fim_snippet_builds_the_training_prompt(request, kind):
    # Defect: the card's snippet tokenized with add_special_tokens=False and no space after ▁<PRE>, so for
    # Code Llama's vocabulary it lost BOS and the prefix's dummy space.
    from codetune.exports.card import fim_prompt_code

    if kind == "codellama":
        tokenizer = request.getfixturevalue("tokenizer")
    elif kind == "codellama-hf":
        tokenizer = request.getfixturevalue("codellama_tokenizer")
    else:
        tokenizer = family_tokenizer(kind)
    code = fim_prompt_code(tokenizer)
    assert code is not None
    transform = family_transform(kind) if kind in FAMILIES else FIMTransform(FIMConfig(), tokenizer)
    for prefix, suffix in CASES:
        scope = {"tokenizer": tokenizer, "prefix": prefix, "suffix": suffix}
        exec(code, scope)
        assert scope["ids"]["input_ids"][0].tolist() == transform.encode_infill_prompt(prefix, suffix, "psm")
