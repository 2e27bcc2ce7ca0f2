"""The objectives against independent, straightforward implementations (docs/methods.md §2–4).

Each method is checked three ways in float64: the reported value and its autograd gradient from
a plain [B, T, V] implementation written here, and the closed-form logit gradient w·(p − Q) from
the methods table. The fused path must then equal from_logits (value and gradients wrt hidden and
lm_head weight), whatever the chunk size.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from onpolicy_sft.objectives import OBJECTIVES, Objective, build, hyperparameters
from onpolicy_sft.objectives.adapters import causal_lm_loss, sequence_logps, trainer_loss_func
from onpolicy_sft.objectives.engine import q_target
from onpolicy_sft.objectives.idft import schedule
from onpolicy_sft.ops import IGNORE_INDEX
from tiny import make_tiny_model


B, T, H, V = 4, 6, 8, 13
HP = {
    "power": {"alpha": 0.7},
    "threshold": {"tau": 0.08},
    "label_smoothing": {"epsilon": 0.2},
    "sft_kl": {"lam": 0.3},
    "asft": {"lam": 0.2},
    "hybrid_distill": {"lam": 0.4},
    "target_sft": {"eta": 0.6},
    "idft": {"beta": 0.8},
    "idft_gamma_only": {"detach": "gamma_only"},
    "idft_schedule": {"warmup_ratio": 0.2, "transition_ratio": 0.4},
    "simpo": {"nll_alpha": 0.3},
}
CASES = sorted(OBJECTIVES) + ["idft_gamma_only", "idft_schedule", "target_sft_no_teacher"]


def _name(case: str) -> str:
    return {"idft_gamma_only": "idft", "idft_schedule": "idft", "target_sft_no_teacher": "target_sft"}.get(case, case)


def make_batch(dtype=torch.float64, seed=0, vocab_extra=2):
    """Random hidden/lm_head for a student, a teacher and a reference (padded vocab), labels with ignores."""
    g = torch.Generator().manual_seed(seed)
    data = {
        "hidden": torch.randn(B, T, H, generator=g, dtype=dtype),
        "weight": torch.randn(V, H, generator=g, dtype=dtype) * 0.7,
        "teacher_hidden": torch.randn(B, T, H + 2, generator=g, dtype=dtype),
        "teacher_weight": torch.randn(V + vocab_extra, H + 2, generator=g, dtype=dtype) * 0.7,
        "ref_hidden": torch.randn(B, T, H, generator=g, dtype=dtype),
        "ref_weight": torch.randn(V, H, generator=g, dtype=dtype) * 0.7,
        "ref_logps": -torch.rand(B, generator=g, dtype=dtype) * 10,
    }
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, -1] = -100  # padding
    data["labels"] = labels
    return data


def contexts(case: str, d, kind: str):
    """The context a case gets: logits for from_logits, hidden + lm_head for fused."""
    name = _name(case)
    ctx = {"progress": 0.5}
    roles = [r for r in ("teacher", "ref") if r in (OBJECTIVES[name][1] | OBJECTIVES[name][2])]
    if case == "target_sft_no_teacher":
        roles = []
    for role in roles:
        if kind == "logits":
            ctx[f"{role}_logits"] = d[f"{role}_hidden"] @ d[f"{role}_weight"].T
        else:
            ctx[f"{role}_hidden"], ctx[f"{role}_lm_head_weight"] = d[f"{role}_hidden"], d[f"{role}_weight"]
    if "ref_logps" in OBJECTIVES[name][1]:
        ctx["ref_logps"] = d["ref_logps"]
    return ctx


def objective(case: str, **extra):
    return build(_name(case), **HP.get(case, {}), **extra)


# --- independent straightforward implementations ------------------------------------------------


def reference_loss(case: str, logits, labels, ctx):
    """The reported loss value of each method, as plain differentiable torch code (sg = detach)."""
    name, hp = _name(case), dict(hyperparameters(_name(case)), **HP.get(case, {}))
    valid = labels != -100
    log_p = torch.log_softmax(logits, -1)
    p = log_p.exp()
    ell = log_p.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    p_y = ell.detach().exp()
    entropy = -(p * log_p).sum(-1).detach()
    common = V
    teacher = torch.softmax(ctx["teacher_logits"][..., :common], -1) if "teacher_logits" in ctx else None
    ref = torch.softmax(ctx["ref_logits"], -1) if "ref_logits" in ctx else None

    def ce(q):
        return -(q * log_p[..., : q.shape[-1]]).sum(-1)

    def kl(q):
        return (q * q.log()).sum(-1) + ce(q)

    if name in ("dpo", "simpo"):
        s = torch.where(valid, ell, torch.zeros_like(ell)).sum(-1)
        n = B // 2
        if name == "dpo":
            r = ctx["ref_logps"]
            margin = hp["beta"] * ((s[:n] - r[:n]) - (s[n:] - r[n:]))
            return (-F.logsigmoid(margin)).mean()
        mean = s / valid.sum(-1)
        margin = hp["beta"] * (mean[:n] - mean[n:])
        return (-F.logsigmoid(margin - hp["gamma"]) - hp["nll_alpha"] * mean[:n]).mean()
    if name == "sft":
        per = -ell
    elif name == "dft":
        per = -p_y * ell
    elif name == "power":
        per = (1 - ell.exp() ** hp["alpha"]) / hp["alpha"]
    elif name == "eaft":
        per = -(entropy / math.log(V)) * ell
    elif name == "threshold":
        per = -(p_y > hp["tau"]).double() * ell
    elif name == "label_smoothing":
        per = -(1 - hp["epsilon"]) * ell - hp["epsilon"] * log_p.mean(-1)
    elif name == "sft_kl":
        per = -ell + hp["lam"] * kl(ref)
    elif name == "asft":
        per = -p_y * ell + hp["lam"] * kl(ref)
    elif name == "distill":
        per = ce(teacher)
    elif name == "hybrid_distill":
        per = -(1 - hp["lam"]) * ell + hp["lam"] * ce(teacher)
    elif name == "target_sft":
        if teacher is None:
            resid = p.detach()
        else:
            resid = torch.softmax((1 - hp["eta"]) * logits[..., :common] + hp["eta"] * ctx["teacher_logits"][..., :common], -1)
        per = -p_y * ell + (1 - p_y) * ce(resid.detach())
    elif name == "idft":
        lam = schedule(0.5, hp["warmup_ratio"], hp["transition_ratio"])
        gamma = 1 + lam * ((-(ell + entropy).detach() / hp["beta"]).exp().clamp(hp["gamma_min"], hp["gamma_max"]) - 1)
        weight = ell.exp() ** gamma.detach()
        per = -(weight.detach() if hp["detach"] == "weight" else weight) * ell
    return torch.where(valid, per, torch.zeros_like(per)).sum() / valid.sum()


def closed_form_grad(case: str, logits, labels, ctx):
    """w·(p − Q) straight from the methods table's gradient column, divided by the token count."""
    name, hp = _name(case), dict(hyperparameters(_name(case)), **HP.get(case, {}))
    valid = labels != -100
    logits = logits.detach()
    p = torch.softmax(logits, -1)
    delta = F.one_hot(labels.clamp_min(0), V).to(p.dtype)
    p_y = (p * delta).sum(-1, keepdim=True)
    entropy = -(p * p.log()).sum(-1, keepdim=True)
    teacher = torch.softmax(ctx["teacher_logits"][..., :V], -1) if "teacher_logits" in ctx else None
    ref = torch.softmax(ctx["ref_logits"], -1) if "ref_logits" in ctx else None
    if name in ("dpo", "simpo"):
        s = torch.where(valid, p_y.squeeze(-1).log(), torch.zeros_like(p_y.squeeze(-1))).sum(-1).requires_grad_()
        n = B // 2
        if name == "dpo":
            r = ctx["ref_logps"]
            loss = (-F.logsigmoid(hp["beta"] * ((s[:n] - r[:n]) - (s[n:] - r[n:])))).mean()
        else:
            mean = s / valid.sum(-1)
            loss = (-F.logsigmoid(hp["beta"] * (mean[:n] - mean[n:]) - hp["gamma"]) - hp["nll_alpha"] * mean[:n]).mean()
        (d_s,) = torch.autograd.grad(loss, s)
        grad = d_s[:, None, None] * (delta - p)
        return torch.where(valid.unsqueeze(-1), grad, torch.zeros_like(grad))
    g = {
        "sft": lambda: p - delta,
        "dft": lambda: p_y * (p - delta),
        "power": lambda: p_y ** hp["alpha"] * (p - delta),
        "eaft": lambda: entropy / math.log(V) * (p - delta),
        "threshold": lambda: (p_y > hp["tau"]).double() * (p - delta),
        "label_smoothing": lambda: p - (1 - hp["epsilon"]) * delta - hp["epsilon"] / V,
        "sft_kl": lambda: (1 + hp["lam"]) * p - delta - hp["lam"] * ref,
        "asft": lambda: p_y * (p - delta) + hp["lam"] * (p - ref),
        "distill": lambda: p - teacher,
        "hybrid_distill": lambda: p - (1 - hp["lam"]) * delta - hp["lam"] * teacher,
    }
    if name in g:
        grad = g[name]()
    elif name == "target_sft":
        if teacher is None:
            resid = p
        else:
            resid = torch.softmax((1 - hp["eta"]) * logits + hp["eta"] * ctx["teacher_logits"][..., :V], -1)
        grad = p - p_y * delta - (1 - p_y) * resid
    else:  # idft
        lam = schedule(0.5, hp["warmup_ratio"], hp["transition_ratio"])
        phi = p_y.log() + entropy
        gamma = 1 + lam * ((-phi / hp["beta"]).exp().clamp(hp["gamma_min"], hp["gamma_max"]) - 1)
        w = p_y**gamma
        if hp["detach"] == "gamma_only":
            w = w * (1 + gamma * p_y.log())
        grad = w * (p - delta)
    grad = torch.where(valid.unsqueeze(-1), grad, torch.zeros_like(grad))
    return grad / valid.sum()


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_value_and_gradient_against_autograd_and_closed_form(case):
    d = make_batch()
    ctx = contexts(case, d, "logits")
    logits = (d["hidden"] @ d["weight"].T).requires_grad_()
    loss, metrics = objective(case).from_logits(logits, d["labels"], **ctx)
    (grad,) = torch.autograd.grad(loss, logits)

    logits_ref = logits.detach().clone().requires_grad_()
    expected = reference_loss(case, logits_ref, d["labels"], ctx)
    (grad_ref,) = torch.autograd.grad(expected, logits_ref)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, closed_form_grad(case, logits, d["labels"], ctx), rtol=1e-10, atol=1e-12)
    assert metrics["n_tokens"] == int((d["labels"] != -100).sum())


def _fused_and_logits(case, d, chunk_tokens=5):
    return _fused_and_logits_of(objective(case, chunk_tokens=chunk_tokens), d, case)


def _fused_and_logits_of(obj, d, case="sft"):
    h = d["hidden"].clone().requires_grad_()
    w = d["weight"].clone().requires_grad_()
    loss_f, m_f = obj.fused(h, w, d["labels"], **contexts(case, d, "hidden"))
    gh_f, gw_f = torch.autograd.grad(loss_f, (h, w))
    h2 = d["hidden"].clone().requires_grad_()
    w2 = d["weight"].clone().requires_grad_()
    loss_l, m_l = obj.from_logits(h2 @ w2.T, d["labels"], **contexts(case, d, "logits"))
    gh_l, gw_l = torch.autograd.grad(loss_l, (h2, w2))
    return (loss_f, gh_f, gw_f, m_f), (loss_l, gh_l, gw_l, m_l)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_from_logits(case, dtype):
    fused, logits = _fused_and_logits(case, make_batch(dtype))
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    for a, b in zip(fused[:3], logits[:3]):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **tol)
    assert fused[3].keys() == logits[3].keys()
    for key in fused[3]:
        assert fused[3][key] == pytest.approx(logits[3][key], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("case", ["sft", "target_sft", "sft_kl", "dpo"])
def test_fused_equals_from_logits_when_every_position_counts(case):
    """All labels counted: the flattening takes views, not copies; results must not change."""
    d = make_batch()
    d["labels"] = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    fused, logits = _fused_and_logits(case, d)
    for a, b in zip(fused[:3], logits[:3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert fused[3]["n_tokens"] == B * T


@pytest.mark.parametrize("case", ["sft", "idft", "target_sft", "asft", "dpo", "simpo"])
def test_chunk_size_does_not_change_results(case):
    d = make_batch()
    runs = [_fused_and_logits(case, d, chunk_tokens=c)[0] for c in (1, 3, 7, 4096)]
    for run in runs[1:]:
        for a, b in zip(run[:3], runs[0][:3]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", ["sft", "dft", "target_sft", "dpo"])
def test_bf16_inputs_accumulate_in_float32(case):
    """bf16 hidden/lm_head give a float32 loss and exactly the float32 gradients, rounded once at the end."""
    d = make_batch(torch.float32)
    for key in ("hidden", "weight", "teacher_hidden", "teacher_weight", "ref_hidden", "ref_weight"):
        d[key] = d[key].bfloat16()
    obj = objective(case, chunk_tokens=3)
    h, w = d["hidden"].clone().requires_grad_(), d["weight"].clone().requires_grad_()
    loss, _ = obj.fused(h, w, d["labels"], **contexts(case, d, "hidden"))
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    h32, w32 = d["hidden"].float().requires_grad_(), d["weight"].float().requires_grad_()
    ctx32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in contexts(case, d, "hidden").items()}
    loss32, _ = obj.fused(h32, w32, d["labels"], **ctx32)
    gh32, gw32 = torch.autograd.grad(loss32, (h32, w32))
    assert float(loss.detach()) == float(loss32.detach())
    assert torch.equal(gh, gh32.bfloat16()) and torch.equal(gw, gw32.bfloat16())


@pytest.mark.parametrize("case", CASES)
def test_all_ignored_batch_gives_zero_gradient(case):
    d = make_batch()
    d["labels"][:] = -100
    (loss, gh, gw, metrics), (loss_l, gh_l, gw_l, _) = _fused_and_logits(case, d)
    for t in (loss, gh, gw, loss_l, gh_l, gw_l):
        assert torch.isfinite(t).all()
    assert float(gh.abs().max()) == float(gw.abs().max()) == float(gw_l.abs().max()) == 0.0
    assert metrics["n_tokens"] == 0 and all(math.isfinite(v) for v in metrics.values())
    if not objective(case).pairwise:
        assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("case", CASES)
def test_extreme_probabilities_stay_finite(case):
    """p_y → 1 (label logit +200), p_y → 0 (label logit −200), and a masked (−inf) vocabulary entry."""
    d = make_batch()
    logits = d["hidden"] @ d["weight"].T
    labels = d["labels"]
    onehot = F.one_hot(labels.clamp_min(0), V).bool()
    logits = torch.where(onehot, torch.where(torch.rand(B, T, 1, dtype=logits.dtype) > 0.5, 200.0, -200.0), logits)
    logits[..., -1] = -math.inf
    labels = torch.where(labels == V - 1, 0, labels)
    ctx = contexts(case, d, "logits")
    for role in ("teacher_logits", "ref_logits"):
        if role in ctx:
            ctx[role] = ctx[role] * 50
            ctx[role][..., V - 1] = -math.inf  # masked for every model alike
    logits.requires_grad_()
    loss, metrics = objective(case).from_logits(logits, labels, **ctx)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values())


def _custom(method):
    return Objective(name="custom", method=method, needs=frozenset(), accepts=frozenset(), chunk_tokens=5)


@pytest.mark.parametrize("view", ["itself", "a view"])
def test_residual_that_is_the_engines_own_p_gets_the_right_gradient(view):
    """π̃ = c.probs (the buffer the engine reuses for the gradient) with γ = sg(p_y) is DFT: the engine
    must read π̃ before overwriting p, on both entry points; checked in float64 against autograd."""

    def target(c):
        residual = c.probs if view == "itself" else c.probs[:, :]
        return q_target(c, value=-c.p_y * c.logp, gamma=c.p_y, residual=residual)

    d = make_batch()
    fused, logits = _fused_and_logits_of(_custom(target), d)
    logits_ref = (d["hidden"] @ d["weight"].T).requires_grad_()
    log_p = torch.log_softmax(logits_ref, -1)
    p_y = log_p.gather(-1, d["labels"].clamp_min(0).unsqueeze(-1)).squeeze(-1).exp().detach()
    valid = d["labels"] != -100
    (expected,) = torch.autograd.grad((-p_y * log_p.gather(-1, d["labels"].clamp_min(0).unsqueeze(-1)).squeeze(-1)
                                       * valid).sum() / valid.sum(), logits_ref)
    h, w = d["hidden"], d["weight"]
    for _, gh, gw, _ in (fused, logits):
        torch.testing.assert_close(gh, expected @ w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gw, expected.flatten(0, 1).T @ h.flatten(0, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("field", ["probs", "log_probs", "logp", "entropy"])
def test_an_objective_that_writes_into_the_chunk_is_stopped(field):
    def target(c):
        getattr(c, field).mul_(0.5)
        return q_target(c, value=-c.logp)

    d = make_batch()
    for kind in ("fused", "logits"):
        with pytest.raises(RuntimeError, match="modified a Chunk tensor in place"):
            obj = _custom(target)
            if kind == "fused":
                obj.fused(d["hidden"].requires_grad_(), d["weight"], d["labels"])
            else:
                obj.from_logits((d["hidden"] @ d["weight"].T).requires_grad_(), d["labels"])


def test_unknown_names_and_hyperparameters_raise():
    with pytest.raises(ValueError, match="sft.*simpo|valid"):
        build("sftt")
    with pytest.raises(ValueError, match="alpha"):
        build("power", alpha_=1.0)
    with pytest.raises(ValueError, match="gamma_only"):
        build("idft", detach="all")
    with pytest.raises(ValueError, match="chunk_tokens"):
        build("sft", chunk_tokens=0)
    with pytest.raises(ValueError, match="teacher"):
        build("distill").from_logits(torch.zeros(1, 2, V), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_logps"):
        build("dpo").from_logits(torch.zeros(2, 2, V), torch.zeros(2, 2, dtype=torch.long))


def test_objectives_declare_the_inputs_they_need_and_whether_they_train_on_pairs():
    assert build("dpo").needs == {"ref_logps"} and build("dpo").pairwise and build("simpo").pairwise
    assert build("sft_kl").needs == build("asft").needs == {"ref"}
    assert build("distill").needs == build("hybrid_distill").needs == {"teacher"}
    assert build("target_sft").needs == frozenset() and not build("target_sft").pairwise


def test_idft_schedule_is_zero_in_warmup_then_rises_linearly_and_needs_progress():
    assert schedule(0.0, 0.0, 0.0) == 1.0
    assert schedule(0.1, 0.2, 0.4) == 0.0
    assert schedule(0.4, 0.2, 0.4) == pytest.approx(0.5)
    assert schedule(0.9, 0.2, 0.4) == 1.0
    assert schedule(0.2, 0.2, 0.0) == 1.0
    with pytest.raises(ValueError, match="progress"):
        build("idft", warmup_ratio=0.1).from_logits(torch.zeros(1, 2, V), torch.zeros(1, 2, dtype=torch.long))


def test_idft_during_warmup_is_dft_and_gamma_only_flips_sign():
    d = make_batch()
    logits = (d["hidden"] @ d["weight"].T).requires_grad_()
    warm = build("idft", warmup_ratio=0.5)
    loss_w, m = warm.from_logits(logits, d["labels"], progress=0.1)
    loss_d, _ = build("dft").from_logits(logits, d["labels"])
    torch.testing.assert_close(torch.autograd.grad(loss_w, logits)[0], torch.autograd.grad(loss_d, logits)[0])
    assert m["gamma_mean"] == pytest.approx(1.0)
    # gamma_only: p^γ(1 + γ log p)(p − δ) pushes a label down when p_y < e^(−1/γ).
    z = torch.zeros(1, 1, V, dtype=torch.float64)
    z[0, 0, 0] = -6.0
    z.requires_grad_()
    loss, _ = build("idft", detach="gamma_only").from_logits(z, torch.zeros(1, 1, dtype=torch.long))
    (g,) = torch.autograd.grad(loss, z)
    assert float(g[0, 0, 0]) > 0  # gradient descent lowers the label's logit
    loss, _ = build("idft").from_logits(z, torch.zeros(1, 1, dtype=torch.long))
    assert float(torch.autograd.grad(loss, z)[0][0, 0, 0]) < 0


def test_target_sft_without_teacher_or_eta0_is_dft():
    d = make_batch()
    logits = (d["hidden"] @ d["weight"].T).requires_grad_()
    ctx = contexts("target_sft", d, "logits")
    ctx["teacher_logits"] = ctx["teacher_logits"][..., :V]
    grads = [
        torch.autograd.grad(o.from_logits(logits, d["labels"], **c)[0], logits)[0]
        for o, c in ((build("dft"), {}), (build("target_sft"), {}), (build("target_sft", eta=0.0), ctx))
    ]
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(grads[2], grads[0])


@pytest.mark.parametrize("name", ["dpo", "simpo"])
def test_pair_metrics_are_the_mean_reward_margin_and_the_share_ranked_right(name):
    d = make_batch()
    logits = d["hidden"] @ d["weight"].T
    _, metrics = build(name).from_logits(logits, d["labels"], **contexts(name, d, "logits"))
    valid = d["labels"] != -100
    ell = torch.log_softmax(logits, -1).gather(-1, d["labels"].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    s = (ell * valid).sum(-1)
    if name == "dpo":
        s = s - d["ref_logps"]
        margin = 0.1 * (s[:2] - s[2:])
    else:
        s = s / valid.sum(-1)
        margin = 2.5 * (s[:2] - s[2:])
    assert metrics["reward_margin"] == pytest.approx(float(margin.mean()))
    assert metrics["pair_accuracy"] == pytest.approx(float((margin > 0).double().mean()))


# --- adapters on a tiny Hugging Face model --------------------------------------------------------


def _tiny_batch(tokenizer):
    rows = [tokenizer("2+3=5", add_special_tokens=False)["input_ids"], tokenizer("7*6=42!", add_special_tokens=False)["input_ids"]]
    length = max(map(len, rows))
    ids = torch.full((2, length), tokenizer.pad_token_id)
    mask = torch.zeros(2, length, dtype=torch.long)
    labels = torch.full((2, length), IGNORE_INDEX)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, 4 : len(r)] = torch.tensor(r[4:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_causal_lm_loss_matches_full_logits(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=0).double()
    teacher = make_tiny_model(tiny_tokenizer, seed=1).double()
    batch = _tiny_batch(tiny_tokenizer)
    obj = build("target_sft")
    loss, metrics = causal_lm_loss(model, obj, batch, teacher=teacher)
    fused_grads = torch.autograd.grad(loss, list(model.parameters()))
    out = lambda m: m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # noqa: E731
    with torch.no_grad():
        t_logits = out(teacher)
    loss_ref, _ = obj.from_logits(out(model), batch["labels"][:, 1:], teacher_logits=t_logits)
    ref_grads = torch.autograd.grad(loss_ref, list(model.parameters()))
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert metrics["n_tokens"] == float((batch["labels"][:, 1:] != -100).sum())

    log_p = torch.log_softmax(out(model), -1).detach()
    labels = batch["labels"][:, 1:]
    expected = (log_p.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != -100)).sum(-1)
    torch.testing.assert_close(sequence_logps(model, batch), expected)


def test_trainer_loss_func_normalises_by_num_items(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=0).double()
    batch = _tiny_batch(tiny_tokenizer)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    func = trainer_loss_func(build("sft"))
    n = int((batch["labels"][:, 1:] != -100).sum())
    mean = func(outputs, batch["labels"])
    scaled = func(outputs, batch["labels"], num_items_in_batch=torch.tensor(3 * n))
    torch.testing.assert_close(scaled, mean / 3)
    expected = F.cross_entropy(outputs.logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)
    torch.testing.assert_close(mean, expected)
    assert func.last_metrics["n_tokens"] == n
    with pytest.raises(ValueError, match="teacher"):
        trainer_loss_func(build("distill"))


def test_trainer_loss_func_runs_inside_transformers_trainer(tiny_tokenizer, tmp_path):
    """The signature transformers.Trainer calls: compute_loss_func(outputs, labels, num_items_in_batch=...)."""
    model = make_tiny_model(tiny_tokenizer, seed=0)
    batch = _tiny_batch(tiny_tokenizer)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(2)] * 2
    func = trainer_loss_func(build("idft"), progress=lambda: 0.5)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=args, train_dataset=rows, compute_loss_func=func)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert func.last_metrics["n_tokens"] > 0 and "gamma_mean" in func.last_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_frozen_lm_head_gets_no_gradient_and_hidden_grad_is_unchanged():
    d = make_batch()
    h = d["hidden"].clone().requires_grad_()
    loss, _ = objective("idft", chunk_tokens=5).fused(h, d["weight"], d["labels"])
    (gh,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(gh, _fused_and_logits("idft", d)[0][1], rtol=1e-12, atol=1e-13)
