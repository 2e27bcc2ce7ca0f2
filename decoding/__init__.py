"""Generation backends (transformers, vLLM) and Hinted Decoding (docs/methods.md §5)."""

from __future__ import annotations

from .backend import Backend, BackendUnavailable
from .hf import HFBackend, hf_two_stream
from .mixing import mix_logprobs
from .sampling import HintedDecodingConfig, SamplingConfig
from .vllm_backend import VLLMBackend

__all__ = [
    "Backend",
    "BackendUnavailable",
    "HintedDecodingConfig",
    "SamplingConfig",
    "make_backend",
    "mix_logprobs",
    "two_stream_generate",
]


def make_backend(name: str, model, tokenizer=None, **options) -> Backend:
    """A generation backend: "hf" (transformers, in-memory model) or "vllm" (the vLLM engine).

    `model` is an in-memory transformers model; "vllm" also takes a checkpoint directory or hub
    id, which its engine reads itself. vLLM options are listed in
    decoding.vllm_backend.VLLMBackend; only one vLLM engine can live per process.
    """
    if name == "hf":
        return HFBackend(model, tokenizer, **options)
    if name == "vllm":
        return VLLMBackend(model, tokenizer, **options)
    raise ValueError(f"unknown decoding backend {name!r}: choose 'hf' or 'vllm'")


def two_stream_generate(model, hinted_ids, student_ids, config: HintedDecodingConfig, tokenizer=None) -> list[list[int]]:
    """Hinted Decoding of each (hinted, student) pair; the generated ids only, final eos included.

    `model` is a transformers model or an existing Backend. With config.backend == "vllm" and a
    transformers model, an engine is built for this call and closed after it; to reuse one
    engine across calls, build it with make_backend and pass it as `model`.
    """
    if isinstance(model, Backend):
        return model.two_stream(hinted_ids, student_ids, config, tokenizer)
    if config.backend == "hf":
        return hf_two_stream(model, hinted_ids, student_ids, config, tokenizer)
    with make_backend("vllm", model, tokenizer) as backend:
        return backend.two_stream(hinted_ids, student_ids, config, tokenizer)
