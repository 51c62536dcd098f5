"""llama.cpp's pinned archive: its vocabularies load as Hugging Face tokenizers that tokenize like llama.cpp."""

import pytest
from transformers import AutoTokenizer

from codetune.llama_cpp import reference_tokenizations
from tests.vocabularies import vocabulary


@pytest.mark.parametrize("name", ["starcoder", "deepseek-coder", "qwen2"])
def test_converted_vocabulary_tokenizes_like_llama_cpp(name):
    tokenizer = AutoTokenizer.from_pretrained(vocabulary(name))
    cases = reference_tokenizations(name)
    equal = sum(tokenizer.encode(text, add_special_tokens=False) == ids for text, ids in cases)
    assert len(cases) == 46
    # transformers' GGUF conversion differs from llama.cpp on at most one of its 46 edge cases per vocabulary.
    assert equal >= 45


def test_starcoder2_vocabulary_has_its_fim_and_repository_tokens():
    tokenizer = AutoTokenizer.from_pretrained(vocabulary("starcoder"))
    names = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>", "<file_sep>"]
    assert tokenizer.convert_tokens_to_ids(names) == [1, 2, 3, 4, 5, 6]
    assert len(tokenizer) == 49152
