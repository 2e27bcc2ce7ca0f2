"""Generation backends (transformers, vLLM) and Hinted Decoding (METHODS.md §5)."""

from __future__ import annotations

from .backend import Backend, BackendUnavailable
from .config import HintedDecodingConfig, SamplingConfig
from .mixing import mix_logprobs
from .rewrite import RewriteConfig, rewrite_corpus
from .templates import HintTemplate
from onpolicy_sft.grading import extract_answer, is_correct

__all__ = [
    "Backend",
    "HintTemplate",
    "RewriteConfig",
    "extract_answer",
    "is_correct",
    "rewrite_corpus",
    "BackendUnavailable",
    "HintedDecodingConfig",
    "SamplingConfig",
    "make_backend",
    "mix_logprobs",
    "two_stream_generate",
]


def make_backend(name: str, model, tokenizer=None, **options) -> Backend:
    """A generation backend: "hf" (transformers, in-memory model) or "vllm" (the vLLM engine).

    `model` is an in-memory transformers model or a checkpoint path / model name. vLLM options
    are listed in decoding.vllm_backend.VLLMBackend; only one vLLM engine can live per process.
    """
    if name == "hf":
        from .hf import HFBackend

        return HFBackend(model, tokenizer, **options)
    if name == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(model, tokenizer, **options)
    raise ValueError(f"unknown decoding backend {name!r}: choose 'hf' or 'vllm'")


_shared_vllm: Backend | None = None


def two_stream_generate(model, hinted_ids, student_ids, config: HintedDecodingConfig, tokenizer=None) -> list[list[int]]:
    """Hinted Decoding of each (hinted, student) pair; the generated ids only, final eos included.

    `model` is a transformers model or an existing Backend. With config.backend == "vllm" and a
    transformers model, one engine is built on first use and reused (its weights refreshed from
    the model on every call); build it yourself with make_backend to control its options.
    """
    global _shared_vllm
    if isinstance(model, Backend):
        return model.two_stream(hinted_ids, student_ids, config, tokenizer)
    if config.backend == "hf":
        from .hf import hf_two_stream

        return hf_two_stream(model, hinted_ids, student_ids, config, tokenizer)
    if _shared_vllm is None:
        _shared_vllm = make_backend("vllm", model, tokenizer)
    else:
        _shared_vllm.update_weights(model)
    return _shared_vllm.two_stream(hinted_ids, student_ids, config, tokenizer)
