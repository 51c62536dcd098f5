"""Shared fixtures: a tokenizer trained on the stdlib, tiny model configs, an isolated cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tokenizers and tokenized data are cached per test session, never in the user's cache."""
    if "CODETUNE_CACHE" not in os.environ:
        os.environ["CODETUNE_CACHE"] = str(tmp_path_factory.mktemp("codetune-cache"))
    yield


@pytest.fixture(scope="session")
def tokenizer_spec():
    from codetune.data.tokenizer import TokenizerSpec, TrainTokenizer

    return TokenizerSpec(train=TrainTokenizer(corpus="@stdlib", vocab_size=1024, max_files=60))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_spec, _isolated_cache):
    """A byte-level BPE tokenizer trained on stdlib files, with Code Llama FIM sentinels."""
    from codetune.data.tokenizer import build_tokenizer

    return build_tokenizer(tokenizer_spec)


@pytest.fixture
def tiny_llama():
    return dict(TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """An exported Hugging Face folder: a tiny random Llama (seed 0) and the test-trained tokenizer. Read-only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_LLAMA)
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tokenizer), **cfg)
    folder = tmp_path_factory.mktemp("tiny-model")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def quiet_trainer(root, **kwargs):
    """A CPU Lightning Trainer for unit tests: no logger, checkpoints, progress bar or summary (``kwargs`` win)."""
    import lightning as L

    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    return L.Trainer(**{**options, **kwargs})


@pytest.fixture(scope="session")
def git_repos(tmp_path_factory):
    """Test git repositories (tests/repos.py), made once per session; read-only."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    from tests import repos

    root = tmp_path_factory.mktemp("git-repos")
    mixed, first = repos.mixed_repository(root)
    made = {"mixed": mixed, "mixed_first": first, "package": repos.package_repository(root)}
    made["json"] = repos.json_repository(root)
    made.update(repos.bad_repositories(root / "bad"))
    return made


@pytest.fixture(scope="session")
def codellama_spm(tmp_path_factory):
    """A Code Llama-style SentencePiece tokenizer folder (``tests.vocabularies.code_llama_spm``), trained once."""
    from tests.vocabularies import code_llama_spm

    return code_llama_spm(tmp_path_factory.mktemp("codellama-spm"))


@pytest.fixture(scope="session")
def codellama_tokenizer(codellama_spm):
    """codetune's tokenizer on the SentencePiece folder (``codellama-hf`` sentinels detected). Shared: never change it."""
    from codetune.data.tokenizer import TokenizerSpec, build_tokenizer

    return build_tokenizer(TokenizerSpec(name_or_path=str(codellama_spm)))


@pytest.fixture(scope="session")
def sentencepiece_model(codellama_spm):
    """The SentencePiece processor of that folder: the reference tokenization of the Code Llama tests."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(codellama_spm / "tokenizer.model"))
