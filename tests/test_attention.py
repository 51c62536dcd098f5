"""Attention kernel choice: auto picks flash-attn only where it can run, explicit requests fail loudly."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import logging
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from codetune.model.attention import resolve_attn_implementation

REAL_FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Pretend to be a machine with or without flash_attn installed and a CUDA GPU of some capability.

    ``flash``: ``"working"`` (a ``flash_attn`` package that imports), ``"broken"`` (one whose import fails the way a
    wheel built for another torch does), or ``"absent"``.
    """

    def configure(
        *, flash_installed: bool | None = None, flash: str = "", cuda: bool = True, capability=(8, 0)
    ) -> None:
        flash = flash or ("working" if flash_installed else "absent")
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        if flash != "absent":
            package = tmp_path / "site" / "flash_attn"
            package.mkdir(parents=True, exist_ok=True)
            body = BROKEN_FLASH if flash == "broken" else ""
            (package / "__init__.py").write_text(body)
            monkeypatch.syspath_prepend(str(tmp_path / "site"))
            importlib.invalidate_caches()
        else:

            def find_spec(name, *args, **kwargs):
                return None if name == "flash_attn" else REAL_FIND_SPEC(name, *args, **kwargs)

            monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)

    yield configure
    sys.modules.pop("flash_attn", None)


# What flash-attn 2.x raises after a torch upgrade without a rebuild.
BROKEN_FLASH = (
    "raise ImportError('/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
    "_ZN3c105ErrorC2ENS_14SourceLocationENSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE')\n"
)


def test_a_broken_flash_attn_install_falls_back_to_sdpa_with_a_warning(machine, caplog):
    machine(flash="broken", capability=(9, 0))
    with caplog.at_level(logging.INFO, logger="codetune.model.attention"):
        assert resolve_attn_implementation("auto", "cuda") == "sdpa"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not import" in warnings[0] and "undefined symbol" in warnings[0]
    assert "pip install --force-reinstall" in warnings[0]
    with pytest.raises(ValueError, match="does not import.*undefined symbol.*use attn_implementation: sdpa"):
        resolve_attn_implementation("flash_attention_2", "cuda")


def test_auto_picks_flash_attention_on_ampere_gpu_with_flash_attn(machine, caplog):
    machine(flash_installed=True, capability=(9, 0))
    with caplog.at_level(logging.INFO, logger="codetune.model.attention"):
        assert resolve_attn_implementation("auto", "cuda") == "flash_attention_2"
    assert "flash_attention_2" in caplog.text


@pytest.mark.parametrize(
    ("flash_installed", "cuda", "capability", "device_type", "why"),
    [
        (True, True, (8, 0), "cpu", "needs a CUDA GPU"),
        (True, True, (8, 0), "mps", "needs a CUDA GPU"),
        (False, True, (8, 0), "cuda", "not installed"),
        (True, False, (8, 0), "cuda", "torch sees no CUDA GPU"),
        (True, True, (7, 5), "cuda", "Ampere or newer"),
    ],
)
def test_auto_falls_back_to_sdpa_and_logs_why(
    machine, caplog, flash_installed, cuda, capability, device_type, why
):
    machine(flash_installed=flash_installed, cuda=cuda, capability=capability)
    with caplog.at_level(logging.INFO, logger="codetune.model.attention"):
        assert resolve_attn_implementation("auto", device_type) == "sdpa"
    assert "sdpa" in caplog.text and why in caplog.text


def test_auto_without_flash_attn_installed_here_is_sdpa_even_on_cuda(monkeypatch):
    assert REAL_FIND_SPEC("flash_attn") is None, "this test assumes flash-attn is absent, as on CI"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    assert resolve_attn_implementation("auto", "cuda") == "sdpa"


@pytest.mark.parametrize(
    ("flash_installed", "cuda", "capability", "device_type", "message"),
    [
        (
            True,
            True,
            (8, 0),
            "cpu",
            r"needs a CUDA GPU and the device is 'cpu'.*use attn_implementation: sdpa",
        ),
        (False, True, (8, 0), "cuda", r"not installed \(pip install 'codetune\[gpu\]'\).*sdpa"),
        (True, False, (8, 0), "cuda", "torch sees no CUDA GPU"),
        (True, True, (7, 0), "cuda", "compute capability >= 8.0.*7.0"),
    ],
)
def test_flash_attention_where_it_cannot_run_is_refused(
    machine, flash_installed, cuda, capability, device_type, message
):
    machine(flash_installed=flash_installed, cuda=cuda, capability=capability)
    with pytest.raises(ValueError, match=message):
        resolve_attn_implementation("flash_attention_2", device_type)


@pytest.mark.parametrize("requested", ["sdpa", "eager"])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_explicit_sdpa_or_eager_is_kept_even_where_flash_could_run(machine, requested, device_type):
    machine(flash_installed=True, capability=(9, 0))
    assert resolve_attn_implementation(requested, device_type) == requested


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="'flash' is unknown: use one of"):
        resolve_attn_implementation("flash", "cpu")


def test_auto_choice_on_cpu_is_what_transformers_loads():
    config = LlamaConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32, vocab_size=32
    )
    chosen = resolve_attn_implementation("auto", "cpu")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=chosen)
    assert model.config._attn_implementation == chosen == "sdpa"


# ---- packed rows under flash-attn (kernels faked in torch: flash-attn needs a GPU) ------------------------------
def _sdpa(q, k, v, causal, scale):
    """(batch, seq, heads, dim) attention; grouped key/value heads as flash-attn takes them."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


VARLEN_CALLS: list[list[int]] = []


def fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, deterministic=False):
    """flash-attn's dense kernel: causal over each whole row."""
    return _sdpa(q, k, v, causal, softmax_scale)


def fake_flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, deterministic=False,
):  # fmt: skip
    """flash-attn's varlen kernel: (tokens, heads, dim) cut into sequences at ``cu_seqlens``."""
    assert isinstance(max_seqlen_q, int), "a tensor max_seqlen costs flash-attn a device sync"
    bounds = cu_seqlens_q.tolist()
    VARLEN_CALLS.append(bounds)
    assert bounds[-1] == q.shape[0] and max(b - a for a, b in itertools.pairwise(bounds)) == max_seqlen_q
    parts = [
        _sdpa(q[None, a:b], k[None, a:b], v[None, a:b], causal, softmax_scale)[0]
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(parts)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_packed_rows_stay_apart_under_flash_attention_with_more_than_one_row(monkeypatch, adapter):
    """transformers takes flash-attn's varlen path from ``position_ids`` only for a batch of one row; codetune
    hands it the documents' boundaries, so with 2 rows every document still sees only itself (the oracle: each
    document run alone)."""
    import transformers.modeling_flash_attention_utils as fa

    from codetune.model.build import ModelSpec
    from codetune.modules.causal import CausalLM

    monkeypatch.setattr(
        fa,
        "_lazy_imports",
        lambda *a, **k: (fake_flash_attn_func, fake_flash_attn_varlen_func, None, None, None),
    )
    monkeypatch.setattr(fa, "_loaded_implementation", None)
    config = dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )  # fmt: skip
    spec = ModelSpec(config=config, attn_implementation="sdpa", adapter={"method": adapter, "dropout": 0.0})
    module = CausalLM(model=spec)
    module.configure_model()
    module.model.eval()
    # Two rows of 12: row 0 holds documents of 5 and 7 tokens; row 1 the rest of a document (positions 3..6),
    # then one of 8 tokens. Documents at row starts need no position 0 to be cut.
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7]])
    ids = torch.randint(3, 64, positions.shape, generator=torch.Generator().manual_seed(0))
    documents = [(0, 0, 5), (0, 5, 12), (1, 0, 4), (1, 4, 12)]
    with torch.no_grad():
        alone = {
            d: module.model(input_ids=ids[r : r + 1, a:b], position_ids=positions[r : r + 1, a:b]).logits[0]
            for d, (r, a, b) in enumerate(documents)
        }
        module.model.config._attn_implementation = "flash_attention_2"
        VARLEN_CALLS.clear()
        packed = module(input_ids=ids, position_ids=positions)
    assert VARLEN_CALLS == 2 * [
        [0, 5, 12, 16, 24]
    ]  # each layer took the varlen kernel, cut at every document
    for d, (r, a, b) in enumerate(documents):
        torch.testing.assert_close(packed[r, a:b], alone[d], rtol=1e-4, atol=1e-5, msg=f"document {d}")
