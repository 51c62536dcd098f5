"""The tokenizer builder's sentinel handling for bases that already carry FIM sentinels."""

import pytest

from codetune.data.fim import FIMConfig, FIMSplit, FIMTransform
from codetune.eval.infilling import require_sentinels
from codetune.model.tokens import SENTINEL_SETS, TokenizerSpec, build_tokenizer
from tests.corpora import byte_level_bpe

HF_SPELLING = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]


@pytest.fixture(scope="module")
def codellama_like(tmp_path_factory):
    """A "released" tokenizer folder that spells the Code Llama sentinels as its SentencePiece vocabulary does."""
    folder = tmp_path_factory.mktemp("codellama-like")
    byte_level_bpe(
        ["textwrap.py"],
        ["</s>", *HF_SPELLING],
        vocab_size=500,
        eos_token="</s>",
        additional_special_tokens=HF_SPELLING,
    ).save_pretrained(folder)
    return str(folder)


def test_codellama_hf_reuses_the_trained_sentinel_rows(codellama_like):
    from transformers import AutoTokenizer

    released = AutoTokenizer.from_pretrained(codellama_like)
    tokenizer = build_tokenizer(TokenizerSpec(name_or_path=codellama_like, sentinels="codellama-hf"))
    for token in HF_SPELLING:
        assert tokenizer.convert_tokens_to_ids(token) == released.convert_tokens_to_ids(token)
    assert "<PRE>" not in tokenizer.get_vocab()
    assert require_sentinels(tokenizer, None) == SENTINEL_SETS["codellama-hf"]  # eval finds them unprompted
    # The training layout puts exactly those ids around the pieces.
    transform = FIMTransform(FIMConfig(sentinels="codellama-hf"), tokenizer)
    ids = transform.encode_split(FIMSplit("def f(", "x", "):\n", "psm")).input_ids
    assert [released.convert_tokens_to_ids(t) for t in HF_SPELLING[:3]] == [
        i for i in ids if i in {released.convert_tokens_to_ids(t) for t in HF_SPELLING[:3]}
    ]


def test_asking_for_the_other_spelling_is_refused_before_adding_rows(codellama_like):
    with pytest.raises(
        ValueError, match=r"already carries the `codellama-hf` FIM sentinels.*sentinels: codellama-hf"
    ):
        build_tokenizer(TokenizerSpec(name_or_path=codellama_like, sentinels="codellama"))
