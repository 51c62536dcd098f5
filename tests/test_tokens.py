"""The tokenizer builder's sentinel handling for bases that already carry FIM sentinels."""

import sysconfig
from pathlib import Path

import pytest

from codetune.data.fim import FIMConfig, FIMSplit, FIMTransform
from codetune.eval.infilling import require_sentinels
from codetune.model.tokens import SENTINEL_SETS, TokenizerSpec, build_tokenizer

HF_SPELLING = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]


@pytest.fixture(scope="module")
def codellama_like(tmp_path_factory):
    """A "released" tokenizer folder that spells the Code Llama sentinels as its SentencePiece vocabulary does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["</s>", *HF_SPELLING],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok.train_from_iterator([(stdlib / "textwrap.py").read_text()], trainer)
    folder = tmp_path_factory.mktemp("codellama-like")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", additional_special_tokens=HF_SPELLING
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
