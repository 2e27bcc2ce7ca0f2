"""IDFT, in-distribution fine-tuning (docs/methods.md §3; Zhang et al., arXiv 2602.12222).

γ_raw = clip(exp(−φ/β), γ_min, γ_max), γ = 1 + λ_s (γ_raw − 1), L = −sg(p_y^γ) ℓ: tokens the model
finds plausible (φ ≥ 0) get near-SFT updates, off-distribution ones are damped harder than DFT.
"""

from __future__ import annotations

import torch

from onpolicy_sft.objectives.engine import Chunk, Target, q_target

DETACH_CHOICES = ("weight", "gamma_only")


def schedule(progress: float | None, warmup_ratio: float, transition_ratio: float) -> float:
    """λ_s: 0 during warmup, then a linear rise over the transition, then 1."""
    if warmup_ratio == 0 and transition_ratio == 0:
        return 1.0
    if progress is None:
        raise ValueError("idft with a warmup/transition schedule needs progress (a float in [0, 1])")
    if progress < warmup_ratio:
        return 0.0
    if transition_ratio == 0:
        return 1.0
    return min(1.0, (progress - warmup_ratio) / transition_ratio)


def idft(
    beta: float = 1.0,
    gamma_min: float = 0.1,
    gamma_max: float = 2.0,
    warmup_ratio: float = 0.0,
    transition_ratio: float = 0.0,
    detach: str = "weight",
):
    """detach="weight": gradient p_y^γ (p − δ). detach="gamma_only" (the authors' earlier code):
    L = −p_y^sg(γ) ℓ, gradient p_y^γ (1 + γ ℓ)(p − δ), which pushes labels with p_y < e^(−1/γ) down."""
    if detach not in DETACH_CHOICES:
        raise ValueError(f"detach must be one of {DETACH_CHOICES}, got {detach!r}")
    if not beta > 0 or not 0 <= gamma_min <= gamma_max:
        raise ValueError(f"need beta > 0 and 0 <= gamma_min <= gamma_max, got {beta}, {gamma_min}, {gamma_max}")
    if warmup_ratio < 0 or transition_ratio < 0:
        raise ValueError("warmup_ratio and transition_ratio must be >= 0")

    def target(c: Chunk) -> Target:
        lam = schedule(c.progress, warmup_ratio, transition_ratio)
        gamma = 1 + lam * (torch.exp(-c.phi / beta).clamp(gamma_min, gamma_max) - 1)
        weight = torch.exp(gamma * c.logp)  # p_y^γ
        value = -weight * c.logp
        if detach == "weight":
            return q_target(c, value=value, gamma=weight, residual="self", extra={"gamma": gamma})
        # where(): p_y^γ underflowing to 0 times a huge |1 + γℓ| must stay 0, not NaN.
        w = torch.where(weight > 0, weight * (1 + gamma * c.logp), torch.zeros_like(weight))
        return Target(a=w, b=w, value=value, extra={"gamma": gamma})

    return target
