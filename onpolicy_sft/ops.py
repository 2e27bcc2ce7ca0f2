"""Per-token softmax statistics, the shared math under DDT and the objectives.

Formulas: METHODS.md §1 (Zhang et al., "Towards On-Policy SFT: Distribution Discriminant
Theory and its Applications in LLM Training", arXiv 2602.12222):
    ℓ_t = log p_t(y_t),  H_t = −Σ_v p_t(v) log p_t(v),  φ_t = ℓ_t + H_t,
    V_t = Σ_v p_t(v) (log p_t(v) + H_t)²   (the varentropy, Var[φ_t] under the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 2048


@dataclass
class TokenStats:
    """Per-token statistics; ``logp`` and ``phi`` are 0 where the label is ignored."""

    logp: torch.Tensor
    entropy: torch.Tensor
    phi: torch.Tensor
    varentropy: torch.Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider: softmax statistics are never taken in half precision."""
    return torch.promote_types(dtype, torch.float32)


def softmax_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p, p, H, varentropy) over the last axis, in float32 or wider."""
    logq = torch.log_softmax(logits.to(stats_dtype(logits.dtype)), dim=-1)
    p = logq.exp()
    # where(): masked logits give p = 0 and log p = −inf, whose product must count as 0.
    plogp = torch.where(p > 0, p * logq, torch.zeros_like(p))
    entropy = -plogp.sum(-1)
    centred = torch.where(p > 0, logq + entropy.unsqueeze(-1), torch.zeros_like(p))
    varentropy = (p * centred.square()).sum(-1)
    return logq, p, entropy, varentropy


def label_logp(logq: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℓ with 0 at ignored positions, boolean mask of counted positions)."""
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logq.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp)), valid


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> TokenStats:
    """ℓ, H, φ and varentropy for aligned logits [N, V] and labels [N]."""
    logq, _, entropy, varentropy = softmax_stats(logits)
    logp, valid = label_logp(logq, labels)
    phi = torch.where(valid, logp + entropy, torch.zeros_like(logp))
    return TokenStats(logp=logp, entropy=entropy, phi=phi, varentropy=varentropy)


def logit_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, logits of those rows) for hidden [N, H] and an lm_head weight [V, H], chunk by chunk.

    The matmul runs in the inputs' dtype (bf16 on GPU stays fast); the logits are widened to
    float32 before any softmax, so at most [chunk_tokens, V] floats exist at a time.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, hidden.shape[0]))
        yield rows, hidden[rows] @ weight.T


@torch.no_grad()
def chunked_token_stats(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> TokenStats:
    """``token_stats`` of ``hidden @ weight.T`` without holding the [N, V] logits whole."""
    parts = [token_stats(logits, labels[rows]) for rows, logits in logit_chunks(hidden, weight, chunk_tokens)]
    if not parts:
        empty = hidden.new_zeros(0, dtype=stats_dtype(hidden.dtype))
        return TokenStats(empty, empty, empty, empty)
    return TokenStats(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logp", "entropy", "phi", "varentropy")))
