"""The per-step math of Hinted Decoding: entropy-driven mixing, the nucleus, the draw.

Zhang et al., "Towards On-Policy SFT" (arXiv 2602.12222), docs/methods.md §5:
    λ = clamp(β · H(p) / log V, 0, 1),   m = (1 − λ) log p + λ log q,
nucleus of softmax(m) at top-p, then a draw from softmax(m / τ) inside it.
Every backend calls these functions, so the formulas live only here.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    # Masked (-inf) entries have p = 0 and contribute 0, not nan.
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(logp)).sum(-1)


def combine(logp: torch.Tensor, logq: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(1 − λ) log p + λ log q, taking a stream exactly where λ is 0 or 1 (no 0 · −inf)."""
    lam = lam.unsqueeze(-1)
    mixed = (1 - lam) * logp + lam * logq
    return torch.where(lam == 0, logp, torch.where(lam == 1, logq, mixed))


def mix_logprobs(
    hinted_logits: torch.Tensor,
    student_logits: torch.Tensor,
    beta: float,
    force_lam: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed [B, V], λ [B]): the unnormalised log-mixture of the hinted and student streams.

    Both inputs are raw logits at temperature 1 over the full vocabulary; statistics are
    computed in float32 or wider. force_lam holds, per row, a λ that replaces the entropy
    rule's, or NaN to keep it.
    """
    if hinted_logits.shape != student_logits.shape or hinted_logits.dim() != 2:
        raise ValueError(
            f"mix_logprobs wants two [B, V] logits of the same shape, got "
            f"{tuple(hinted_logits.shape)} and {tuple(student_logits.shape)}"
        )
    dtype = torch.promote_types(hinted_logits.dtype, torch.float32)
    logp = torch.log_softmax(hinted_logits.to(dtype), dim=-1)
    logq = torch.log_softmax(student_logits.to(dtype), dim=-1)
    lam = (beta * _entropy(logp) / math.log(logp.shape[-1])).clamp(0.0, 1.0)
    if force_lam is not None:
        force_lam = force_lam.to(lam.device, lam.dtype)
        lam = torch.where(torch.isnan(force_lam), lam, force_lam)
    return combine(logp, logq, lam), lam


def top_p_mask(logits: torch.Tensor, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """The logits with everything outside the top-p nucleus of softmax(logits) set to −inf.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p; the most
    likely token is always kept. Only the `candidates` most likely tokens are sorted: every token
    below them has at least their whole mass before it, so it is outside the nucleus whenever
    that mass reaches top_p; rows where it does not (a flat distribution) are sorted in full.
    """
    if top_p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    top, order = probs.topk(min(candidates, probs.shape[-1]), dim=-1)
    mass = top.cumsum(-1)
    if top.shape[-1] < probs.shape[-1] and bool((mass[:, -1] < top_p).any()):
        top, order = probs.sort(dim=-1, descending=True)
        mass = top.cumsum(-1)
    keep_sorted = (mass - top) < top_p
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def draw(logits: torch.Tensor, temperature: float, u: torch.Tensor | None) -> torch.Tensor:
    """One token per row from softmax(logits / temperature); argmax when temperature is 0.

    Row i inverts the CDF at u[i] (decoding.mixing.uniforms: a function of the row's stream and
    step alone), so a row's token does not depend on which other rows share its batch.
    """
    if temperature == 0:
        return logits.argmax(-1)
    if u is None or u.shape != logits.shape[:1]:
        raise ValueError(f"draw needs one uniform per row: {None if u is None else tuple(u.shape)} for {logits.shape[0]} rows")
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    u = u.to(cdf.device, torch.float64) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
    # Guard against landing on a zero-probability tail entry by rounding at the top end.
    return torch.minimum(tokens, (probs > 0).cumsum(-1).argmax(-1))


def hinted_step(
    hinted_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    beta: float,
    top_p: float,
    temperature: float,
    u: torch.Tensor | None,
    force_lam: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], λ [B]) for one lock-step of the two streams.

    u holds each row's uniform for the draw (unused at temperature 0); force_lam holds, per row,
    0 (hinted alone: the first token), 1 (student alone: after the answer marker) or NaN (use the
    entropy rule).
    """
    mixed, lam = mix_logprobs(hinted_logits, student_logits, beta, force_lam)
    tokens = draw(top_p_mask(mixed, top_p), temperature, u)
    return tokens, lam


def plain_step(logits: torch.Tensor, *, top_p: float, temperature: float, u: torch.Tensor | None) -> torch.Tensor:
    """Plain sampling: temperature first, then the top-p cut (transformers' and vLLM's order)."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    return draw(top_p_mask(scaled, top_p), 1.0, u)


def stream_seeds(seed: int, count: int, seeds: list[int] | None = None, per_row: int = 1) -> list[int]:
    """The seed of every stream: `per_row` consecutive streams per prompt.

    With explicit `seeds` (one per prompt), prompt i's streams are seeds[i], seeds[i] + 1, …, so
    a caller that derives seeds from row ids gets results independent of batching and order.
    Without, stream k is seed·1_000_003 + k, so rows of one call never share a stream.
    """
    if seeds is None:
        return [seed * 1_000_003 + k for k in range(count * per_row)]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} prompts: pass one seed per prompt")
    return [int(s) + j for s in seeds for j in range(per_row)]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over uint64 arrays: every input bit reaches every output bit."""
    # numpy's uint64 arrays wrap on overflow: the result is exact and the same on every machine.
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def stream_keys(seeds) -> np.ndarray:
    """The key of every stream seed (any Python ints), the one input of its draws besides the step."""
    return mix64(np.array([int(s) % (1 << 64) for s in seeds], dtype=np.uint64))


def uniforms(keys: np.ndarray, steps) -> np.ndarray:
    """One float64 uniform in [0, 1) per stream: output number `step` of a SplitMix64 sequence that
    starts at the stream's key (a counter-based generator, no state to carry).

    A draw depends on its stream and step alone, never on the batch, the device, the backend or
    the number of processes, and all rows are drawn at once.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    steps = np.broadcast_to(np.asarray(steps, dtype=np.int64), keys.shape).astype(np.uint64)
    bits = mix64(keys + (steps + np.uint64(1)) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
