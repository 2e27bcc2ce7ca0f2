"""The chunked-softmax primitive (docs/methods.md §1): exact statistics, one −inf policy, chunking."""

from __future__ import annotations

import math

import pytest
import torch

from onpolicy_sft.ops import IGNORE_INDEX, Source, log_floor, softmax, softmax_chunks


def _direct(z: torch.Tensor, y: int) -> dict[str, float]:
    """Textbook float64 statistics of one row, over its finite entries only."""
    z = z.double()
    keep = torch.isfinite(z)
    log_p = z[keep] - torch.logsumexp(z[keep], 0)
    p = log_p.exp()
    entropy = float(-(p * log_p).sum())
    return {"entropy": entropy, "varentropy": float((p * log_p**2).sum() - entropy**2),
            "logp": float(z[y] - torch.logsumexp(z[keep], 0)) if bool(keep[y]) else None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_masked_entries_have_probability_zero_and_finite_statistics(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 11, generator=g) * 3).to(dtype)
    logits[:, 7:] = -math.inf  # a masked tail (a padded vocabulary)
    logits[2, :6] = -math.inf  # a row with a single allowed entry: p is one-hot
    labels = torch.tensor([0, 3, 6, 9, IGNORE_INDEX, 1])  # row 3's label is masked
    s = softmax(logits, labels, varentropy=True)
    stats = torch.promote_types(dtype, torch.float32)
    assert s.probs.dtype == s.log_probs.dtype == stats
    for t in (s.log_probs, s.probs, s.logp, s.entropy, s.varentropy):
        assert torch.isfinite(t).all()
    assert float(s.probs[:, 7:].abs().max()) == 0.0
    assert bool((s.log_probs[:, 7:] == log_floor(stats)).all())
    assert bool(s.logp[3] == log_floor(stats))  # "impossible", finite
    assert float(s.logp[4]) == 0.0  # ignored label
    for i in range(6):
        want = _direct(logits[i], int(labels[i]) if labels[i] >= 0 else 0)
        assert float(s.entropy[i]) == pytest.approx(want["entropy"], abs=1e-5)
        assert float(s.varentropy[i]) == pytest.approx(want["varentropy"], abs=1e-4)
        if i not in (3, 4):
            assert float(s.logp[i]) == pytest.approx(want["logp"], abs=1e-5)
    assert float(s.entropy[2]) == 0.0 and float(s.varentropy[2]) == 0.0


def test_chunks_equal_one_pass_and_leave_given_logits_untouched():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(13, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (13,), generator=g)
    whole = softmax(hidden @ weight.T, labels, varentropy=True)
    logits = hidden @ weight.T
    kept = logits.clone()
    for source in (Source(hidden=hidden, weight=weight), Source(logits=logits)):
        for chunk_tokens in (1, 4, 100):
            parts = list(softmax_chunks(source, labels, chunk_tokens=chunk_tokens, varentropy=True))
            assert [r.start for r, _ in parts] == list(range(0, 13, chunk_tokens))
            for name in ("log_probs", "probs", "logp", "entropy", "varentropy"):
                got = torch.cat([getattr(s, name) for _, s in parts])
                torch.testing.assert_close(got, getattr(whole, name), rtol=1e-12, atol=1e-12)
    assert torch.equal(logits, kept)
    with pytest.raises(ValueError, match="chunk_tokens"):
        next(softmax_chunks(Source(logits=logits), chunk_tokens=0))
