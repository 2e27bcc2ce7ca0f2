"""The Objective object: the two entry points (from_logits, fused) around the chunked engine.

Token objectives run one engine pass. Sequence objectives (DPO, SimPO; docs/methods.md §4) run a
gradient-free chunked pass for the per-sequence sums of ℓ, differentiate the pair loss wrt
those sums (B numbers), and then run the engine with per-token weight −∂L/∂s_row(t), whose
logit gradient −∂L/∂s (p − δ) is exactly the chain rule through s = Σ_t ℓ_t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from onpolicy_sft.objectives import engine
from onpolicy_sft.objectives.engine import DEFAULT_CHUNK_TOKENS, Chunk, Plan, Target
from onpolicy_sft.ops import Source

CONTEXT_KEYS = frozenset(
    {"teacher_logits", "ref_logits", "ref_logps", "progress", "teacher_hidden", "teacher_lm_head_weight",
     "ref_hidden", "ref_lm_head_weight"}
)


@dataclass
class PairLoss:
    """A sequence objective: ``loss(s, lengths, ref_logps) -> (per-pair loss [P], reward margin [P])``.

    s and lengths are [2P] (chosen rows first, then rejected), ref_logps [2P] or None.
    """

    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Objective:
    name: str
    method: Callable[[Chunk], Target] | PairLoss
    needs: frozenset[str]
    accepts: frozenset[str]  # models the objective uses when given (needs plus optional ones)
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    @property
    def pairwise(self) -> bool:
        return isinstance(self.method, PairLoss)

    def from_logits(self, logits: torch.Tensor, labels: torch.Tensor, **context):
        """(loss, metrics) from aligned logits [B, T, V] (or [N, V]) and labels [B, T] (or [N])."""
        self._check(context, "logits")
        roles = self._models(context, "logits")
        labels_v, rows, (logits_v, *others) = engine.flatten_valid(labels, logits, *(context[f"{k}_logits"] for k in roles))
        others = {k: Source(logits=t) for k, t in zip(roles, others)}
        return self._run(Source(logits=logits_v), labels_v, rows, others, context, labels.shape[0])

    def fused(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, **context):
        """(loss, metrics) from last hidden states [B, T, H] and lm_head weight [V, H], chunked over tokens."""
        self._check(context, "hidden")
        roles = self._models(context, "hidden")
        labels_v, rows, (hidden_v, *others) = engine.flatten_valid(labels, hidden, *(context[f"{k}_hidden"] for k in roles))
        others = {k: Source(hidden=t, weight=context[f"{k}_lm_head_weight"]) for k, t in zip(roles, others)}
        return self._run(Source(hidden=hidden_v, weight=lm_head_weight), labels_v, rows, others, context, labels.shape[0])

    # -----------------------------------------------------------------------------------------

    def _models(self, context, kind: str) -> list[str]:
        key = "_logits" if kind == "logits" else "_hidden"
        return [m for m in ("teacher", "ref") if m in self.accepts and context.get(m + key) is not None]

    def _check(self, context, kind: str) -> None:
        unknown = set(context) - CONTEXT_KEYS
        if unknown:
            raise ValueError(f"{self.name}: unknown context {sorted(unknown)}; valid: {sorted(CONTEXT_KEYS)}")
        for need in self.needs:
            keys = ["ref_logps"] if need == "ref_logps" else (
                [f"{need}_logits"] if kind == "logits" else [f"{need}_hidden", f"{need}_lm_head_weight"]
            )
            missing = [k for k in keys if context.get(k) is None]
            if missing:
                raise ValueError(f"{self.name} needs {', '.join(missing)}")

    def _run(self, source: Source, labels, rows, others, context, batch_size: int):
        progress = context.get("progress")
        n = labels.shape[0]
        if not self.pairwise:
            plan = Plan(self.method, labels, None, others, 1.0 / max(n, 1), 0.0, progress, self.chunk_tokens)
            loss = engine.token_loss(plan, source)
            return loss, engine.mean_metrics(plan.sums, n)
        return self._run_pairs(source, labels, rows, context, batch_size)

    def _run_pairs(self, source: Source, labels, rows, context, batch_size: int):
        if batch_size % 2:
            raise ValueError(f"{self.name}: a pairwise batch has an even number of rows [chosen..., rejected...]")
        detached = Source(*(t.detach() if t is not None else None for t in (source.logits, source.hidden, source.weight)))
        logp, _ = engine.token_logps(detached, labels, self.chunk_tokens)
        sums = torch.zeros(batch_size, dtype=logp.dtype, device=logp.device).index_add_(0, rows, logp)
        lengths = torch.bincount(rows, minlength=batch_size).to(logp.dtype)
        ref = context.get("ref_logps")
        ref = ref.to(device=logp.device, dtype=logp.dtype) if ref is not None else None
        with torch.enable_grad():
            s = sums.clone().requires_grad_(True)
            per_pair, margin = self.method.loss(s, lengths, ref)
            pair_loss = per_pair.mean()
            (d_s,) = torch.autograd.grad(pair_loss, s)
        coef = -d_s  # ∂L/∂z_t = ∂L/∂s (δ − p) = (−∂L/∂s)(p − δ)

        def weights(c: Chunk) -> Target:
            w = coef[c.rows]
            return Target(a=w, b=w, value=torch.zeros_like(w))

        plan = Plan(weights, labels, rows, {}, 1.0, float(pair_loss.detach()), context.get("progress"), self.chunk_tokens)
        loss = engine.token_loss(plan, source)
        metrics = engine.mean_metrics(plan.sums, labels.shape[0])
        margin = margin.detach()
        metrics.update(reward_margin=float(margin.mean()), pair_accuracy=float((margin > 0).to(margin.dtype).mean()))
        return loss, metrics
