"""One chunked engine for every token objective: loss value and logit gradient a·p − b·δ − c·π̃.

docs/methods.md §2 (Xie et al., "A Unifying Lens on Supervised Fine-Tuning Through Target
Distribution Design", arXiv 2606.11189): a token loss L_t = w_t·CE(sg(Q_t), p_t) with
Q_t = γ_t δ_t + (1 − γ_t) π̃_t has logit gradient w_t (p_t − Q_t). A method therefore only says,
per token, three stop-gradient coefficients (a = w, b = w·γ, c = w·(1 − γ)), the residual π̃
and the value it reports; this module does the rest.

The gradient is known in closed form, so the forward pass computes it right away, chunk by
chunk, and folds it into grad_hidden (rows of the chunk) and grad_W (a running sum). The
backward pass only scales the saved gradients by grad_output: no [N, V] tensor for all N tokens
is ever alive, and no logits are recomputed. Logits given directly (``from_logits``) go through
the same per-chunk code, so the two entry points agree to rounding.

Names follow the papers: p is the model's softmax (``Chunk.probs``/``Chunk.log_probs``, from
``ops.softmax``, whose −inf policy holds here too), Q the target a method defines.

A method must not modify what it reads: the engine reuses the chunk's p as the gradient buffer
once the method has returned. A residual that is (a view of) ``Chunk.probs`` itself is therefore
copied before that reuse, and a method that writes into a chunk tensor in place is stopped with
an error instead of corrupting the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from onpolicy_sft.ops import IGNORE_INDEX, Source, softmax_chunks, stats_dtype

DEFAULT_CHUNK_TOKENS = 512  # [512, V] float32 buffers: ~100 MB each at V = 49152


@dataclass
class Chunk:
    """What a method may read about one chunk of n counted tokens (all stop-gradient, read-only)."""

    log_probs: torch.Tensor  # [n, V] log p in float32 or wider (masked entries at ops.log_floor)
    probs: torch.Tensor  # [n, V] p
    labels: torch.Tensor  # [n]
    logp: torch.Tensor  # [n] ℓ_t = log p_t(y_t)
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
        return self.log_probs.shape[-1]

    def cross_entropy(self, dist: torch.Tensor) -> torch.Tensor:
        """−Σ_v dist(v) log p(v) over the first dist.shape[-1] entries; 0·log 0 counts as 0."""
        log_probs = self.log_probs[:, : dist.shape[-1]]
        return -torch.where(dist > 0, dist * log_probs, torch.zeros((), dtype=log_probs.dtype)).sum(-1)


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


def _widened(source: Source, dtype: torch.dtype) -> Source:
    """The source with its lm_head in ``dtype`` once, so every chunk's matmul runs in ``dtype``."""
    return source if source.weight is None else Source(hidden=source.hidden, weight=source.weight.to(dtype))


def _shares_memory(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _versions(chunk: Chunk) -> list[int]:
    tensors = [chunk.log_probs, chunk.probs, chunk.labels, chunk.logp, chunk.entropy, *chunk.others.values()]
    return [t._version for t in tensors]


def _call(method: Method, chunk: Chunk) -> Target:
    """The method's target, refusing a method that wrote into the chunk (the gradient would be wrong)."""
    before = _versions(chunk)
    target = method(chunk)
    if _versions(chunk) != before:
        raise RuntimeError(
            "an objective modified a Chunk tensor in place; methods must treat the chunk as read-only "
            "(the engine reuses its buffers for the gradient): compute new tensors instead"
        )
    # The engine overwrites p with the gradient below: a target tensor that is (a view of) p must be
    # copied first, or the gradient would read back the overwritten values.
    for name in ("a", "b", "c", "residual"):
        value = getattr(target, name)
        if _shares_memory(value, chunk.probs):
            setattr(target, name, value.clone())
    return target


def _chunk_loop(plan: Plan, source: Source, dtype: torch.dtype, want_grad: bool):
    """Yield (rows, gradient wrt the chunk's logits or None); accumulate loss and metrics in plan.sums."""
    others = {k: _widened(s, dtype) for k, s in plan.others.items()}
    common = min([source.vocab] + [s.vocab for s in others.values()])
    sums = plan.sums
    for rows, sm in softmax_chunks(source, plan.labels, chunk_tokens=plan.chunk_tokens, dtype=dtype):
        labels, p, logp, entropy = plan.labels[rows], sm.probs, sm.logp, sm.entropy
        chunk = Chunk(
            log_probs=sm.log_probs, probs=p, labels=labels, logp=logp, entropy=entropy,
            others={k: s.chunk(rows, dtype)[:, :common] for k, s in others.items()},
            rows=plan.rows[rows] if plan.rows is not None else None, progress=plan.progress,
        )
        target = _call(plan.method, chunk)
        for key, values in {
            "value": target.value, "phi": logp + entropy, "weight": target.b, "p_y": logp.exp(), "entropy": entropy,
            **target.extra,
        }.items():
            sums[key] = sums[key] + values.sum() if key in sums else values.sum()
        if not want_grad:
            yield rows, None
            continue
        del sm, chunk  # log p is no longer needed: free it before the gradient
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
    parts = [(sm.logp, sm.entropy)
             for _, sm in softmax_chunks(_widened(source, dtype), labels, chunk_tokens=chunk_tokens, dtype=dtype)]
    if not parts:
        empty = torch.zeros(0, dtype=dtype, device=labels.device)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


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
