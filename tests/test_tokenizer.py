"""The tokenizer builder's sentinel handling for bases that already carry FIM sentinels."""

import pytest

from codetune.data.fim import FIMConfig, FIMSplit, FIMTransform
from codetune.data.tokenizer import SENTINEL_SETS, TokenizerSpec, build_tokenizer
from codetune.eval.infilling import require_sentinels
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
    transform = FIMTransform(FIMConfig(), tokenizer)
    ids = transform.encode_split(FIMSplit("def f(", "x", "):\n", "psm")).input_ids
    assert [released.convert_tokens_to_ids(t) for t in HF_SPELLING[:3]] == [
        i for i in ids if i in {released.convert_tokens_to_ids(t) for t in HF_SPELLING[:3]}
    ]


def test_asking_for_the_other_spelling_is_refused_before_adding_rows(codellama_like):
    with pytest.raises(
        ValueError, match=r"already carries the `codellama-hf` FIM sentinels.*sentinels: codellama-hf"
    ):
        build_tokenizer(TokenizerSpec(name_or_path=codellama_like, sentinels="codellama"))


def test_a_set_whose_end_token_is_the_eos_is_still_refused_next_to_another_set(tokenizer, tmp_path):
    # The conftest tokenizer carries the Code Llama sentinels, and StarCoder's end token <|endoftext|> as its EOS.
    assert tokenizer.eos_token == SENTINEL_SETS["starcoder"].end
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already carries the `codellama` FIM sentinels"):
        build_tokenizer(TokenizerSpec(name_or_path=str(tmp_path), sentinels="starcoder"))


def test_inference_picks_the_set_a_run_added_when_the_base_has_its_own_too(codellama_like):
    from transformers import AutoTokenizer

    # A run fine-tuned a Code Llama tokenizer with the plain `codellama` spelling: both sets are now present.
    tokenizer = AutoTokenizer.from_pretrained(codellama_like)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": SENTINEL_SETS["codellama"].tokens()}, replace_extra_special_tokens=False
    )
    assert require_sentinels(tokenizer, None) == SENTINEL_SETS["codellama"]
