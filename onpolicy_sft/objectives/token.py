"""Token objectives as targets Q_t = γ_t δ_t + (1 − γ_t) π̃_t with scale w_t (docs/methods.md §2).

Each factory takes the method's hyperparameters (its signature is the list build() accepts)
and returns a function from a chunk to its Target: the method's whole definition. Gradients
follow from the target (engine.py); ``value`` is the "loss value reported" column of the table.
Sources: Xie et al., arXiv 2606.11189 (the Q-target lens, Target-SFT); DFT = "SFT(p)"/p-loss;
the power family (Beyond log-likelihood); EAFT; ProFiT thresholding; ASFT (DFT anchored by a KL).
"""

from __future__ import annotations

import math

import torch

from onpolicy_sft.objectives.engine import Chunk, Target, q_target
from onpolicy_sft.ops import softmax


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def _unit(name: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _dist(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, log p) of a frozen model's logits chunk, by the same softmax (and −inf policy) as the model's."""
    s = softmax(logits)
    return s.probs, s.log_probs


def _kl(c: Chunk, ref: torch.Tensor, log_ref: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ p) per token; gradient wrt z is p − π_ref."""
    return c.cross_entropy(ref) + torch.where(ref > 0, ref * log_ref, torch.zeros((), dtype=ref.dtype)).sum(-1)


def sft():
    """Q = δ: plain cross-entropy."""
    return lambda c: q_target(c, value=-c.logp)


def dft():
    """Q = p_y δ + (1 − p_y) sg(p): gradient p_y (p − δ)."""

    def target(c: Chunk) -> Target:
        p_y = c.p_y
        return q_target(c, value=-p_y * c.logp, gamma=p_y, residual="self")

    return target


def power(alpha: float = 0.5):
    """γ = sg(p_y^α), π̃ = sg(p); reported (1 − p_y^α)/α."""
    alpha = _positive("alpha", alpha)

    def target(c: Chunk) -> Target:
        gamma = c.p_y.pow(alpha)
        return q_target(c, value=(1 - gamma) / alpha, gamma=gamma, residual="self")

    return target


def eaft():
    """γ = sg(H / log V), π̃ = sg(p): entropy-adaptive trust in the label."""

    def target(c: Chunk) -> Target:
        gamma = c.entropy / math.log(c.vocab)
        return q_target(c, value=-gamma * c.logp, gamma=gamma, residual="self")

    return target


def threshold(tau: float = 0.1):
    """γ = 1[p_y > τ], π̃ = sg(p): train only on labels the model already finds plausible."""
    tau = _unit("tau", tau)

    def target(c: Chunk) -> Target:
        mask = (c.p_y > tau).to(c.logp.dtype)
        return q_target(c, value=-mask * c.logp, gamma=mask, residual="self")

    return target


def label_smoothing(epsilon: float = 0.1):
    """Q = (1 − ε) δ + ε · uniform."""
    epsilon = _unit("epsilon", epsilon)

    def target(c: Chunk) -> Target:
        uniform = torch.full((c.logp.shape[0], 1), 1.0 / c.vocab, dtype=c.logp.dtype, device=c.logp.device)
        value = -(1 - epsilon) * c.logp - epsilon * c.log_probs.mean(-1)
        return q_target(c, value=value, gamma=1 - epsilon, residual=uniform)

    return target


def sft_kl(lam: float = 0.1):
    """w = 1 + λ, Q = (δ + λ π_ref)/(1 + λ): SFT plus λ KL(π_ref ‖ p) to a frozen reference."""
    lam = _positive("lam", lam)

    def target(c: Chunk) -> Target:
        ref, log_ref = _dist(c.others["ref"])
        value = -c.logp + lam * _kl(c, ref, log_ref)
        return q_target(c, value=value, w=1 + lam, gamma=1 / (1 + lam), residual=ref)

    return target


def asft(lam: float = 0.1):
    """w = p_y + λ, Q = (p_y δ + λ π_ref)/(p_y + λ): DFT anchored by λ KL(π_ref ‖ p).

    Written as a, b, c directly so that p_y + λ = 0 never divides.
    """
    lam = _positive("lam", lam)

    def target(c: Chunk) -> Target:
        ref, log_ref = _dist(c.others["ref"])
        p_y = c.p_y
        value = -p_y * c.logp + lam * _kl(c, ref, log_ref)
        return Target(a=p_y + lam, b=p_y, c=torch.full_like(p_y, lam), residual=ref, value=value)

    return target


def distill():
    """Q = π_T: cross-entropy to the teacher's distribution."""

    def target(c: Chunk) -> Target:
        teacher, _ = _dist(c.others["teacher"])
        return q_target(c, value=c.cross_entropy(teacher), gamma=0.0, residual=teacher)

    return target


def hybrid_distill(lam: float = 0.5):
    """Q = (1 − λ) δ + λ π_T."""
    lam = _unit("lam", lam)

    def target(c: Chunk) -> Target:
        teacher, _ = _dist(c.others["teacher"])
        value = -(1 - lam) * c.logp + lam * c.cross_entropy(teacher)
        return q_target(c, value=value, gamma=1 - lam, residual=teacher)

    return target


def target_sft(eta: float = 0.5):
    """Q = p_y δ + (1 − p_y) π̃, π̃ = sg softmax((1 − η) z + η z_T) (Xie et al. 2606.11189).

    Without a teacher π̃ = sg(p): exactly DFT's gradient, reported as CE(Q, p).
    """
    eta = _unit("eta", eta)

    def target(c: Chunk) -> Target:
        p_y = c.p_y
        teacher = c.others.get("teacher")
        if teacher is None:
            return q_target(c, value=-p_y * c.logp + (1 - p_y) * c.entropy, gamma=p_y, residual="self")
        # log p differs from z by a per-row constant, which the softmax ignores.
        residual = torch.softmax((1 - eta) * c.log_probs[:, : teacher.shape[-1]] + eta * teacher, -1)
        value = -p_y * c.logp + (1 - p_y) * c.cross_entropy(residual)
        return q_target(c, value=value, gamma=p_y, residual=residual)

    return target
