"""Sequence objectives on preference pairs: DPO and SimPO (docs/methods.md §4).

s(y) = Σ_t ℓ_t; the batch is [chosen_0 … chosen_{P−1}, rejected_0 … rejected_{P−1}].
DPO (Rafailov et al. 2023): L = −log σ(β[(s_c − r_c) − (s_r − r_r)]), r the frozen reference's s.
SimPO (Meng et al. 2024): L = −log σ(β(s̄_c − s̄_r) − γ) + α·(−s̄_c), s̄ = s/|y|, no reference.
Each returns a PairLoss; objective.py turns ∂L/∂s into per-token weights for the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onpolicy_sft.objectives.objective import PairLoss


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0] // 2
    return x[:n], x[n:]


def dpo(beta: float = 0.1) -> PairLoss:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")

    def loss(s, lengths, ref):
        chosen, rejected = _halves(s - ref)
        margin = beta * (chosen - rejected)
        return -F.logsigmoid(margin), margin

    return PairLoss(loss)


def simpo(beta: float = 2.5, gamma: float = 1.375, nll_alpha: float = 0.0) -> PairLoss:
    if not beta > 0 or nll_alpha < 0:
        raise ValueError(f"need beta > 0 and nll_alpha >= 0, got {beta}, {nll_alpha}")

    def loss(s, lengths, ref):
        chosen, rejected = _halves(s / lengths.clamp_min(1))
        margin = beta * (chosen - rejected)
        return -F.logsigmoid(margin - gamma) - nll_alpha * chosen, margin

    return PairLoss(loss)
