"""Training objectives: ``build(name, **hparams)`` -> Objective with ``from_logits`` and ``fused``.

Every token method is a target distribution Q_t = γ_t δ_t + (1 − γ_t) π̃_t with a scale w_t
(docs/methods.md §2–3); DPO and SimPO (§4) reuse the same chunked engine with per-sequence weights.
The hyperparameters of a method are the keyword arguments of its factory (token.py, idft.py,
preference.py), defaults included; ``chunk_tokens`` (tokens per chunk) is accepted by all.
"""

from __future__ import annotations

import inspect

from onpolicy_sft.objectives import idft as _idft
from onpolicy_sft.objectives import preference, token
from onpolicy_sft.objectives.engine import DEFAULT_CHUNK_TOKENS
from onpolicy_sft.objectives.objective import Objective

# name -> (factory, models it needs, models it uses when given)
OBJECTIVES = {
    "sft": (token.sft, set(), set()),
    "dft": (token.dft, set(), set()),
    "power": (token.power, set(), set()),
    "eaft": (token.eaft, set(), set()),
    "threshold": (token.threshold, set(), set()),
    "label_smoothing": (token.label_smoothing, set(), set()),
    "sft_kl": (token.sft_kl, {"ref"}, set()),
    "asft": (token.asft, {"ref"}, set()),
    "distill": (token.distill, {"teacher"}, set()),
    "hybrid_distill": (token.hybrid_distill, {"teacher"}, set()),
    "target_sft": (token.target_sft, set(), {"teacher"}),
    "idft": (_idft.idft, set(), set()),
    "dpo": (preference.dpo, {"ref_logps"}, set()),
    "simpo": (preference.simpo, set(), set()),
}


def hyperparameters(name: str) -> dict[str, object]:
    """The hyperparameters ``name`` accepts and their defaults."""
    factory = _entry(name)[0]
    return {k: p.default for k, p in inspect.signature(factory).parameters.items()}


def build(name: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, **hparams) -> Objective:
    factory, needs, optional = _entry(name)
    valid = hyperparameters(name)
    unknown = set(hparams) - set(valid)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {sorted(unknown)} for objective {name!r}; valid: {sorted(valid) + ['chunk_tokens']}"
        )
    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    return Objective(
        name=name, method=factory(**hparams), needs=frozenset(needs), accepts=frozenset(needs | optional),
        chunk_tokens=chunk_tokens,
    )


def _entry(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "Objective", "build", "hyperparameters"]
