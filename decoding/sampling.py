"""The two decoding configurations: plain sampling and Hinted Decoding (docs/methods.md §5)."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("hf", "vllm")


def _check_common(where: str, temperature: float, top_p: float, max_new_tokens: int) -> None:
    if temperature < 0:
        raise ValueError(f"{where}.temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{where}.top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"{where}.max_new_tokens must be >= 1, got {max_new_tokens}")


@dataclass
class SamplingConfig:
    """Plain sampling for self-answers and evaluation: n completions per prompt.

    temperature 0 is greedy (then n > 1 gives n identical completions). Temperature is applied
    before the top-p cut, as in transformers and vLLM. A completion stops after the token that
    completes one of the ``stop`` strings (that token is kept), at end-of-sequence (kept), or
    at ``max_new_tokens``.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingConfig.n must be >= 1, got {self.n}")
        _check_common("SamplingConfig", self.temperature, self.top_p, self.max_new_tokens)
        if isinstance(self.stop, str):
            self.stop = [self.stop]


@dataclass
class HintedDecodingConfig:
    """Two-stream Hinted Decoding (Zhang et al., arXiv 2602.12222; docs/methods.md §5).

    beta scales the hinted stream's normalised entropy into the student weight λ; the nucleus
    (top_p) is cut on the untempered mixture, then the temperature applies. The answer guard
    switches to the student stream alone once the generated text contains a final-answer marker
    (it needs a tokenizer): ``answer_marker`` "auto" watches every form the checker reads
    (decoding.rules.ANSWER_MARKERS), "" turns the guard off, and any other string is watched
    for in addition to those forms (decoding.rules.answer_markers). Generation stops
    when some ``repeat_window``-token window has occurred ``repeat_count`` times. ``batch_size``
    is the number of prompt pairs decoded at once.
    """

    beta: float = 3.0
    temperature: float = 0.3
    top_p: float = 0.95
    max_new_tokens: int = 512
    answer_marker: str = "auto"
    repeat_window: int = 30
    repeat_count: int = 5
    first_from_hinted: bool = True
    backend: str = "hf"
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"HintedDecodingConfig.beta must be >= 0 (0 = pure hinted rewrite), got {self.beta}")
        _check_common("HintedDecodingConfig", self.temperature, self.top_p, self.max_new_tokens)
        if self.repeat_window < 1 or self.repeat_count < 2:
            raise ValueError(
                "HintedDecodingConfig needs repeat_window >= 1 and repeat_count >= 2, "
                f"got {self.repeat_window} and {self.repeat_count}"
            )
        if not isinstance(self.answer_marker, str):
            raise TypeError(f"HintedDecodingConfig.answer_marker must be a string, got {type(self.answer_marker).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"HintedDecodingConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.batch_size < 1:
            raise ValueError(f"HintedDecodingConfig.batch_size must be >= 1, got {self.batch_size}")
