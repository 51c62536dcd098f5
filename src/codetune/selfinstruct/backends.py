"""Where generated text comes from: transformers ``generate`` (default), or vLLM offline inference when installed.

Both get the same prompts and the same sampling settings (:class:`~codetune.selfinstruct.settings.Sampling`)
and answer one list of :class:`~codetune.eval.generate.Sample` per prompt. Anything with the same
``generate`` method works (the tests drive the pipeline with a scripted one).

Models load through :func:`codetune.checkpoints.load_trained` (exported folder, checkpoint or run dir);
vLLM reads exported Hugging Face folders only. Code from a model folder never runs (``trust_remote_code``
off in both).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from codetune.checkpoints import load_trained, locate
from codetune.eval.generate import Sample, generate
from codetune.selfinstruct.settings import Sampling

log = logging.getLogger(__name__)

BackendKind = Literal["transformers", "vllm", "auto"]


class Backend(Protocol):
    """A text generator the stages can use."""

    name: str
    """``transformers``, ``vllm``, ... (recorded in every result's provenance)."""
    model: str
    """What generates, as the user named it."""

    def generate(
        self, prompts: Sequence[str], sampling: Sampling, num_samples: int, stop: Sequence[str], seed: int
    ) -> list[list[Sample]]:
        """``num_samples`` continuations of each prompt, each cut before its first stop string."""
        ...


class TransformersBackend:
    """Batched ``model.generate`` on CPU or GPU (:func:`codetune.eval.generate.generate`)."""

    name = "transformers"

    def __init__(self, model: str, batch_size: int = 8, device: str = "auto") -> None:
        import torch  # heavy: imported when a model is actually loaded

        self.model = model
        self.batch_size = batch_size
        self._model, self.tokenizer = load_trained(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model.to(device)
        self.device = device

    def generate(
        self, prompts: Sequence[str], sampling: Sampling, num_samples: int, stop: Sequence[str], seed: int
    ) -> list[list[Sample]]:
        return generate(
            self._model, self.tokenizer, list(prompts), max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, num_samples=num_samples, stop=stop,
            batch_size=self.batch_size, seed=seed,
        )  # fmt: skip


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_sampling_params(
    sampling: Sampling, num_samples: int, stop: Sequence[str], seed: int
) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments meaning what :func:`codetune.eval.generate.generate` does with the same
    settings: temperature 0 is greedy (top_p then 1), stop strings are cut off, not kept."""
    greedy = sampling.temperature == 0
    return {
        "n": num_samples,
        "temperature": 0.0 if greedy else sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "stop": list(stop),
        "include_stop_str_in_output": False,
        "seed": seed,
    }


class VLLMBackend:
    """vLLM's offline ``LLM.generate`` (GPU); the optional extra ``pip install 'codetune[vllm]'``."""

    name = "vllm"

    def __init__(self, model: str, seed: int = 0, options: dict[str, Any] | None = None) -> None:
        if not vllm_installed():
            raise ValueError(
                "backend vllm: vLLM is not installed (pip install 'codetune[vllm]'), or use transformers"
            )
        location = locate(model)
        if location.kind != "hf_folder":
            raise ValueError(
                f"backend vllm: {model} is a {location.kind.replace('_', ' ')}; vLLM loads exported Hugging Face "
                "folders: run `codetune export` on it first, or use backend transformers"
            )
        self.model = model
        self._vllm = importlib.import_module("vllm")  # optional and heavy: imported only when chosen
        self.llm = self._vllm.LLM(
            model=str(location.path), tokenizer=str(location.path), trust_remote_code=False, seed=seed,
            **(options or {}),
        )  # fmt: skip

    def generate(
        self, prompts: Sequence[str], sampling: Sampling, num_samples: int, stop: Sequence[str], seed: int
    ) -> list[list[Sample]]:
        params = self._vllm.SamplingParams(**vllm_sampling_params(sampling, num_samples, stop, seed))
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [
            [
                Sample(o.text, len(o.token_ids), "length" if o.finish_reason == "length" else "stop")
                for o in out.outputs
            ]
            for out in outputs
        ]


def resolve_kind(kind: BackendKind, model: str) -> str:
    """``auto``: vLLM when it is installed, a GPU is present and ``model`` is an exported folder; else transformers."""
    if kind != "auto":
        return kind
    if not vllm_installed():
        return "transformers"
    import torch

    if not torch.cuda.is_available() or locate(model).kind != "hf_folder":
        return "transformers"
    return "vllm"


def load_backend(
    kind: BackendKind,
    model: str,
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
    vllm_options: dict[str, Any] | None = None,
) -> Backend:
    """A ready backend for ``model`` that has generated one token, or one line saying why it cannot."""
    try:
        chosen = resolve_kind(kind, model)
        backend: Backend = (
            VLLMBackend(model, seed=seed, options=vllm_options)
            if chosen == "vllm"
            else TransformersBackend(model, batch_size=batch_size, device=device)
        )
        check_generates(backend)
    except Exception as err:  # any failure to load or generate: one line, before any work
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model {model} cannot generate: {reason}") from err
    log.info("selfinstruct: %s generates with %s", model, backend.name)
    return backend


def check_generates(backend: Backend) -> None:
    """Generate one token greedily, so a model that cannot generate fails before any work."""
    out = backend.generate(["def"], Sampling(temperature=0.0, max_new_tokens=1), 1, (), 0)
    if len(out) != 1 or len(out[0]) != 1:
        raise ValueError(f"the backend answered {len(out)} prompts for 1")


def sample(
    backend: Backend,
    prompts: Sequence[str],
    sampling: Sampling,
    num_samples: int,
    stop: Sequence[str],
    seed: int,
) -> list[list[Sample]]:
    """``backend.generate``, checked to answer ``num_samples`` samples for every prompt."""
    out = backend.generate(list(prompts), sampling, num_samples, stop, seed)
    if len(out) != len(prompts) or any(len(s) != num_samples for s in out):
        raise ValueError(
            f"backend {getattr(backend, 'name', backend)!r} answered {[len(s) for s in out]} samples for "
            f"{len(prompts)} prompts x {num_samples}"
        )
    return out
