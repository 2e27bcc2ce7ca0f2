"""The vLLM side of Hinted Decoding: a batch-level logits processor for vLLM's legacy (V1) model
runner, a thin adapter over decoding.pairs.PairBook.

vLLM loads it by its qualified name, MIXER = "decoding.vllm_mixer:HintedPairMixer", so that an
engine core or tensor-parallel worker in a spawned process imports it rather than unpickling a
class object. This module imports vllm: import it only where vllm is installed.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .pairs import KEY, PairBook, check_spec

MIXER = f"{__name__}:HintedPairMixer"


def _spec(params):
    return (params.extra_args or {}).get(KEY) if params is not None else None


class HintedPairMixer(LogitsProcessor):
    """Pairs each hinted request with its student request and samples once for both."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        # Runs in the frontend when a request is added: a malformed spec fails there, not in the engine.
        spec = _spec(sampling_params)
        if spec is not None:
            check_spec(spec)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        path = vllm_config.model_config.tokenizer
        self.book = PairBook(lambda: AutoTokenizer.from_pretrained(path))

    def is_argmax_invariant(self) -> bool:
        return False  # it picks the token of every paired row, greedy requests included

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        self.book.update(
            batch_update.removed,
            [(index, _spec(params), out) for index, params, _, out in batch_update.added],
            [(a, b, how == MoveDirectionality.SWAP) for a, b, how in batch_update.moved],
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.book.apply(logits)
