"""The chunked softmax under everything: DDT scoring, the objectives engine, DPO's log-probs, forgetting.

Formulas (docs/methods.md §1; Zhang et al., "Towards On-Policy SFT: Distribution Discriminant
Theory and its Applications in LLM Training", arXiv 2602.12222), at one position with logits z:
    p = softmax(z),  ℓ = log p(y),  H = −Σ_v p(v) log p(v),  φ = ℓ + H,
    V = Σ_v p(v) (log p(v) + H)²   (the varentropy, Var[φ] under the model).
Names follow the papers: p (``probs``, ``log_probs``) is always the model being scored or trained;
Q is reserved for a training target (objectives/engine.py).

One policy for masked vocabulary entries (logit −inf): their probability is exactly 0 and their
log-probability is floored at ``log_floor(dtype)`` = −√(largest float)/4 instead of −inf. The floor
is so low that exp() of it is 0, yet its square stays finite, so every p-weighted sum (H, V, a
cross-entropy, a KL) counts such an entry as 0 · finite = 0, never 0 · ∞ = NaN. A label that falls
on a masked entry gets ℓ = the floor: a finite, hugely negative number that says "impossible".

Rows are processed ``chunk_tokens`` at a time (``softmax_chunks``), so at most [chunk_tokens, V]
floats of logits and probabilities exist at once, however many tokens there are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 2048


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider: softmax statistics are never taken in half precision."""
    return torch.promote_types(dtype, torch.float32)


def log_floor(dtype: torch.dtype) -> float:
    """The log-probability given to a masked (−inf) logit: exp() is 0, the square is finite."""
    return -math.sqrt(torch.finfo(dtype).max) / 4


@dataclass
class Softmax:
    """The softmax of one chunk of n positions over V entries, in float32 or wider."""

    log_probs: torch.Tensor  # [n, V] log p, floored at log_floor
    probs: torch.Tensor  # [n, V] p
    logp: torch.Tensor  # [n] ℓ, the label's log p (0 where the label is ignored or there are no labels)
    entropy: torch.Tensor  # [n] H
    varentropy: torch.Tensor | None = None  # [n] V, when asked for

    @property
    def phi(self) -> torch.Tensor:
        return self.logp + self.entropy


def softmax(logits: torch.Tensor, labels: torch.Tensor | None = None, *, inplace: bool = False,
            varentropy: bool = False) -> Softmax:
    """``Softmax`` of logits [n, V] (any float dtype; widened to float32 or more first).

    ``inplace``: the caller hands over a fresh buffer (a matmul result) that may become
    ``log_probs``; this saves one [n, V] buffer on the training path.
    """
    dtype = stats_dtype(logits.dtype)
    z = logits.to(dtype)
    lse = torch.logsumexp(z, -1, keepdim=True)
    # A widening copy is ours to overwrite too.
    log_probs = z.sub_(lse) if inplace or z is not logits else z - lse
    log_probs.clamp_(min=log_floor(dtype))
    probs = log_probs.exp()
    entropy = -torch.linalg.vecdot(probs, log_probs)
    if labels is None:
        logp = torch.zeros_like(entropy)
    else:
        valid = labels != IGNORE_INDEX
        picked = log_probs.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
        logp = torch.where(valid, picked, 0.0)
    var = None
    if varentropy:
        var = torch.linalg.vecdot(probs, (log_probs + entropy.unsqueeze(-1)).square())
    return Softmax(log_probs=log_probs, probs=probs, logp=logp, entropy=entropy, varentropy=var)


@dataclass
class Source:
    """Where logits come from: given logits [N, V], or hidden states [N, H] times an lm_head [V, H].

    For hidden states the matmul runs in the weight's dtype (bf16 on GPU stays fast) and only
    its [chunk, V] result is widened; pass a widened weight to multiply in float32.
    """

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return (self.logits if self.logits is not None else self.hidden).shape[0]

    @property
    def vocab(self) -> int:
        return self.logits.shape[-1] if self.logits is not None else self.weight.shape[0]

    @property
    def owned_chunks(self) -> bool:
        """Whether ``chunk`` returns fresh buffers (matmul results) rather than views of the input."""
        return self.logits is None

    def tensors(self) -> tuple:
        return (self.logits,) if self.logits is not None else (self.hidden, self.weight)

    def chunk(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """Logits of ``rows`` in ``dtype``."""
        if self.logits is not None:
            return self.logits[rows].to(dtype)
        return (self.hidden[rows].to(self.weight.dtype) @ self.weight.T).to(dtype)


def row_chunks(n: int, chunk_tokens: int) -> Iterator[slice]:
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    for start in range(0, n, chunk_tokens):
        yield slice(start, min(start + chunk_tokens, n))


def softmax_chunks(source: Source, labels: torch.Tensor | None = None, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   dtype: torch.dtype | None = None, varentropy: bool = False) -> Iterator[tuple[slice, Softmax]]:
    """(rows, ``Softmax`` of those rows) for every chunk of ``source``: the one chunked-softmax loop.

    ``dtype`` (default: the statistics dtype of the source) is the dtype the logits are widened to.
    Each chunk's tensors may be overwritten by the caller: the next chunk uses new buffers.
    """
    dtype = dtype or stats_dtype(source.tensors()[-1].dtype)
    for rows in row_chunks(source.n, chunk_tokens):
        yield rows, softmax(source.chunk(rows, dtype), labels[rows] if labels is not None else None,
                            inplace=source.owned_chunks, varentropy=varentropy)


@dataclass
class TokenStats:
    """Per-token statistics; ``logp`` and ``phi`` are 0 where the label is ignored."""

    logp: torch.Tensor
    entropy: torch.Tensor
    phi: torch.Tensor
    varentropy: torch.Tensor


def _token_stats(s: Softmax, labels: torch.Tensor) -> TokenStats:
    phi = torch.where(labels != IGNORE_INDEX, s.phi, 0.0)
    return TokenStats(logp=s.logp, entropy=s.entropy, phi=phi, varentropy=s.varentropy)


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> TokenStats:
    """ℓ, H, φ and varentropy for aligned logits [N, V] and labels [N]."""
    return _token_stats(softmax(logits, labels, varentropy=True), labels)


@torch.no_grad()
def chunked_token_stats(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> TokenStats:
    """``token_stats`` of ``hidden @ weight.T`` without holding the [N, V] logits whole."""
    parts = [_token_stats(s, labels[rows])
             for rows, s in softmax_chunks(Source(hidden=hidden, weight=weight), labels, chunk_tokens=chunk_tokens,
                                           varentropy=True)]
    if not parts:
        empty = hidden.new_zeros(0, dtype=stats_dtype(hidden.dtype))
        return TokenStats(empty, empty, empty, empty)
    return TokenStats(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logp", "entropy", "phi", "varentropy")))
