"""One chunked engine for every token objective: loss value and logit gradient a·p − b·δ − c·π̃.

METHODS.md §2 (Xie et al., "A Unifying Lens on Supervised Fine-Tuning Through Target
Distribution Design", arXiv 2606.11189): a token loss L_t = w_t·CE(sg(Q_t), p_t) with
Q_t = γ_t δ_t + (1 − γ_t) π̃_t has logit gradient w_t (p_t − Q_t). A method therefore only says,
per token, three stop-gradient coefficients (a = w, b = w·γ, c = w·(1 − γ)), the residual π̃
and the value it reports; this module does the rest.

The gradient is known in closed form, so the forward pass computes it right away, chunk by
chunk, and folds it into grad_hidden (rows of the chunk) and grad_W (a running sum). The
backward pass only scales the saved gradients by grad_output: no [N, V] tensor for all N tokens
is ever alive, and no logits are recomputed. Logits given directly (``from_logits``) go through
the same per-chunk code, so the two entry points agree to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from onpolicy_sft.ops import IGNORE_INDEX, stats_dtype

DEFAULT_CHUNK_TOKENS = 512  # [512, V] float32 buffers: ~100 MB each at V = 49152


@dataclass
class Chunk:
    """What a method may read about one chunk of n counted tokens (all stop-gradient)."""

    logq: torch.Tensor  # [n, V] log-softmax in float32 or wider (−inf clamped to the dtype's minimum)
    p: torch.Tensor  # [n, V] softmax
    labels: torch.Tensor  # [n]
    logp: torch.Tensor  # [n] ℓ_t
    entropy: torch.Tensor  # [n] H_t
    others: dict[str, torch.Tensor]  # "teacher"/"ref" logits [n, V'] sliced to the common vocabulary
    rows: torch.Tensor  # [n] sequence index of each token (only for sequence objectives)
    progress: float | None

    @property
    def p_y(self) -> torch.Tensor:
        return self.logp.exp()

    @property
    def phi(self) -> torch.Tensor:
        return self.logp + self.entropy

    @property
    def vocab(self) -> int:
        return self.logq.shape[-1]

    def cross_entropy(self, dist: torch.Tensor) -> torch.Tensor:
        """−Σ_v dist(v) log p(v) over the first dist.shape[-1] entries; 0·log 0 counts as 0."""
        logq = self.logq[:, : dist.shape[-1]]
        return -torch.where(dist > 0, dist * logq, torch.zeros((), dtype=logq.dtype)).sum(-1)


@dataclass
class Target:
    """Per-token gradient a·p − b·δ − c·π̃ and reported loss value, all [n] (π̃ is [n, V'] or [n, 1]).

    Build it with ``q_target`` from (w, γ, π̃), or set a, b, c directly when a γ would be 0/0.
    ``residual=None`` means c must be 0; ``residual`` of width 1 broadcasts over the whole vocabulary.
    """

    a: torch.Tensor
    b: torch.Tensor
    value: torch.Tensor
    c: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # more per-token metrics to average


def q_target(chunk: Chunk, value, w=1.0, gamma=1.0, residual=None, extra=None) -> Target:
    """Target for L = w·CE(Q, p), Q = γδ + (1 − γ)π̃. residual="self" means π̃ = sg(p), folded into a."""
    n, extra = chunk.logp.shape[0], extra or {}
    like = {"dtype": chunk.logp.dtype, "device": chunk.logp.device}
    w = torch.as_tensor(w, **like).expand(n)
    gamma = torch.as_tensor(gamma, **like).expand(n)
    if isinstance(residual, str):
        # w(p − γδ − (1 − γ)p) = wγ(p − δ): no [n, V] residual needed.
        return Target(a=w * gamma, b=w * gamma, value=value, extra=extra)
    if residual is None:
        return Target(a=w, b=w * gamma, value=value, extra=extra)
    return Target(a=w, b=w * gamma, c=w * (1 - gamma), residual=residual, value=value, extra=extra)


Method = Callable[[Chunk], Target]


@dataclass
class Source:
    """Where a model's logits come from: given logits [N, V], or hidden [N, H] times an lm_head [V, H]."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return (self.logits if self.logits is not None else self.hidden).shape[0]

    @property
    def vocab(self) -> int:
        return (self.logits if self.logits is not None else self.weight).shape[-2 if self.logits is None else -1]

    def tensors(self) -> tuple:
        return (self.logits,) if self.logits is not None else (self.hidden, self.weight)

    def chunk(self, rows: slice, dtype: torch.dtype, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.logits is not None:
            return self.logits[rows].to(dtype)
        w = weight if weight is not None else self.weight.to(dtype)
        return self.hidden[rows].to(dtype) @ w.T


@dataclass
class Plan:
    """Everything the autograd function needs besides tensors; metrics come back in ``sums``."""

    method: Method
    labels: torch.Tensor
    rows: torch.Tensor | None
    others: dict[str, Source]
    scale: float
    constant: float
    progress: float | None
    chunk_tokens: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # 0-dim tensors: no device sync per chunk

    def loss(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        value = self.sums.get("value", torch.zeros((), dtype=dtype, device=like.device))
        return (self.scale * value + self.constant).to(dtype)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, stats_dtype(t.dtype))
    return dtype


def _softmax_chunk(z: torch.Tensor, labels: torch.Tensor, owned: bool):
    """(logq, p, ℓ, H) of a logits chunk, with as few [n, V] temporaries as possible.

    ``owned``: z is a fresh buffer (a matmul result) that may be overwritten by log p.
    """
    lse = torch.logsumexp(z, -1, keepdim=True)
    logq = z.sub_(lse) if owned else z - lse
    # A masked (−inf) logit would make 0·(−inf) = NaN in sums below; its p is 0 either way.
    logq.clamp_(min=torch.finfo(logq.dtype).min)
    p = logq.exp()
    entropy = -torch.linalg.vecdot(p, logq)
    logp = logq.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logq, p, logp, entropy


def _chunk_loop(plan: Plan, source: Source, dtype: torch.dtype, want_grad: bool):
    """Yield (rows, gradient wrt the chunk's logits or None); accumulate loss and metrics in plan.sums."""
    weight = source.weight.to(dtype) if source.weight is not None else None
    other_weights = {k: (s.weight.to(dtype) if s.weight is not None else None) for k, s in plan.others.items()}
    common = min([source.vocab] + [s.vocab for s in plan.others.values()])
    sums = plan.sums
    for start in range(0, source.n, plan.chunk_tokens):
        rows = slice(start, min(start + plan.chunk_tokens, source.n))
        labels = plan.labels[rows]
        logq, p, logp, entropy = _softmax_chunk(source.chunk(rows, dtype, weight), labels, source.logits is None)
        others = {k: s.chunk(rows, dtype, other_weights[k])[:, :common] for k, s in plan.others.items()}
        chunk = Chunk(
            logq=logq, p=p, labels=labels, logp=logp, entropy=entropy, others=others,
            rows=plan.rows[rows] if plan.rows is not None else None, progress=plan.progress,
        )
        target = plan.method(chunk)
        for key, values in {
            "value": target.value, "phi": logp + entropy, "weight": target.b, "p_y": logp.exp(), "entropy": entropy,
            **target.extra,
        }.items():
            sums[key] = sums[key] + values.sum() if key in sums else values.sum()
        if not want_grad:
            yield rows, None
            continue
        del logq, chunk
        # g = scale·(a·p − b·δ − c·π̃), written over p to save one [n, V] buffer.
        grad = p.mul_((plan.scale * target.a).unsqueeze(-1))
        grad.scatter_add_(-1, labels.unsqueeze(-1), -(plan.scale * target.b).unsqueeze(-1))
        if target.c is not None:
            width = grad.shape[-1] if target.residual.shape[-1] == 1 else target.residual.shape[-1]
            grad[:, :width].sub_((plan.scale * target.c).unsqueeze(-1) * target.residual)
        yield rows, grad


def _scaled(grad: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad · grad_output in the input's dtype; no [N, V]-sized copy in the usual case grad_output = 1."""
    if bool(grad_out == 1):
        return grad.to(dtype)
    return (grad * grad_out).to(dtype)


class _FusedLoss(torch.autograd.Function):
    """loss(hidden [N, H], weight [V, H]); gradients made in the forward pass, scaled in backward."""

    @staticmethod
    def forward(ctx, plan: Plan, hidden, weight, *other_tensors):
        dtype = compute_dtype(hidden, weight, *other_tensors)
        want_h, want_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_w else None
        w = weight.to(dtype)  # once: the chunk loop reuses it
        for rows, g in _chunk_loop(plan, Source(hidden=hidden, weight=w), dtype, want_h or want_w):
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[rows])
            if grad_w is not None:
                grad_w.addmm_(g.T, hidden[rows].to(dtype))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return plan.loss(hidden, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = _scaled(grad_h, grad_out, ctx.dtypes[0]) if ctx.needs_input_grad[1] else None
        gw = _scaled(grad_w, grad_out, ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        return (None, gh, gw) + (None,) * (len(ctx.needs_input_grad) - 3)


class _LogitsLoss(torch.autograd.Function):
    """loss(logits [N, V]) through the same chunk loop; the gradient is [N, V] like its input."""

    @staticmethod
    def forward(ctx, plan: Plan, logits, *other_tensors):
        dtype = compute_dtype(logits, *other_tensors)
        want = ctx.needs_input_grad[1]
        grad = torch.zeros(logits.shape, dtype=dtype, device=logits.device) if want else None
        for rows, g in _chunk_loop(plan, Source(logits=logits), dtype, want):
            if g is not None:
                grad[rows] = g
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        return plan.loss(logits, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = _scaled(grad, grad_out, ctx.dtype) if ctx.needs_input_grad[1] else None
        return (None, g) + (None,) * (len(ctx.needs_input_grad) - 2)


def _others_tensors(others: dict[str, Source]) -> list[torch.Tensor]:
    return [t.detach() for s in others.values() for t in s.tensors()]


def token_loss(plan: Plan, source: Source) -> torch.Tensor:
    """The scalar loss scale·Σ_t value_t + constant, differentiable wrt the source's tensors."""
    others = _others_tensors(plan.others)
    if source.logits is not None:
        return _LogitsLoss.apply(plan, source.logits, *others)
    return _FusedLoss.apply(plan, source.hidden, source.weight, *others)


@torch.no_grad()
def token_logps(source: Source, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """(ℓ, H) per token of a source, chunked, without gradient (the first pass of DPO/SimPO)."""
    dtype = compute_dtype(*source.tensors())
    weight = source.weight.to(dtype) if source.weight is not None else None
    logps, entropies = [], []
    for start in range(0, source.n, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, source.n))
        _, _, logp, entropy = _softmax_chunk(source.chunk(rows, dtype, weight), labels[rows], source.logits is None)
        logps.append(logp)
        entropies.append(entropy)
    if not logps:
        empty = torch.zeros(0, dtype=dtype, device=labels.device)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)


def flatten_valid(labels: torch.Tensor, *tensors: torch.Tensor | None):
    """Keep only counted positions: (labels [n], row index [n], each tensor [..., X] -> [n, X])."""
    valid = labels != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(-1).expand_as(labels) if labels.dim() > 1 else (
        torch.zeros_like(labels)
    )
    if bool(valid.all()):  # a view, not a copy: matters for [B, T, V] logits
        return labels.reshape(-1), rows.reshape(-1), [t.flatten(0, labels.dim() - 1) if t is not None else None for t in tensors]
    out = [t[valid] if t is not None else None for t in tensors]
    return labels[valid], rows[valid], out


def mean_metrics(sums: dict[str, torch.Tensor], n_tokens: int) -> dict[str, float]:
    denom = max(n_tokens, 1)
    names = {"phi": "phi_mean", "weight": "weight_mean", "p_y": "p_y_mean", "entropy": "entropy_mean"}
    metrics = {"n_tokens": float(n_tokens), **{name: 0.0 for name in names.values()}}
    for key, total in sums.items():
        if key != "value":
            metrics[names.get(key, f"{key}_mean")] = float(total) / denom
    return metrics
