"""The per-step math of Hinted Decoding against independent float64 computations."""

import math
import random

import numpy as np
import pytest
import torch

from decoding import mix_logprobs
from decoding.mixing import draw, hinted_step, plain_step, stream_keys, stream_seeds, top_p_mask, uniforms
from decoding.rules import RepetitionStop, repetition_length


def _formula(h, s, beta):
    """docs/methods.md §5 written out by hand in float64, row by row."""
    rows, lams = [], []
    for hr, sr in zip(h.double(), s.double()):
        logp = hr - math.log(sum(math.exp(x) for x in hr.tolist()))
        logq = sr - math.log(sum(math.exp(x) for x in sr.tolist()))
        entropy = -sum(math.exp(lp) * lp for lp in logp.tolist())
        lam = min(max(beta * entropy / math.log(len(hr)), 0.0), 1.0)
        rows.append((1 - lam) * logp + lam * logq)
        lams.append(lam)
    return torch.stack(rows), torch.tensor(lams, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.0, 0.5, 3.0, 50.0])
def test_mix_logprobs_matches_formula(beta):
    g = torch.Generator().manual_seed(1)
    # Rows from peaked to flat so λ covers 0 < λ < 1 and the clamp at 1.
    h = torch.randn(5, 37, generator=g, dtype=torch.float64) * torch.tensor([8.0, 4.0, 1.0, 0.3, 0.0]).unsqueeze(1)
    s = torch.randn(5, 37, generator=g, dtype=torch.float64) * 2
    mixed, lam = mix_logprobs(h, s, beta)
    want_mixed, want_lam = _formula(h, s, beta)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(lam, want_lam, atol=1e-12, rtol=0)
    torch.testing.assert_close(mixed, want_mixed, atol=1e-12, rtol=0)
    if beta == 0.0:
        assert (lam == 0).all()
    if beta == 50.0:
        assert lam[-1] == 1.0  # a uniform hinted row hands over to the student entirely


def test_mix_logprobs_computes_in_float32_and_refuses_mismatched_shapes():
    h, s = torch.randn(2, 11), torch.randn(2, 11)
    mixed, lam = mix_logprobs(h.half(), s.half(), 3.0)
    assert mixed.dtype == torch.float32 and lam.shape == (2,)
    with pytest.raises(ValueError, match="same shape"):
        mix_logprobs(h, s[:, :5], 3.0)
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        mix_logprobs(h[0], s[0], 3.0)


def test_mix_logprobs_tolerates_masked_logits():
    h = torch.tensor([[0.0, float("-inf"), 1.0]])
    s = torch.tensor([[float("-inf"), 0.0, 0.0]])
    mixed, lam = mix_logprobs(h, s, 1.0)
    assert torch.isfinite(lam).all() and not torch.isnan(mixed).any()


@pytest.mark.parametrize("candidates", [9, 3])
def test_top_p_mask_is_smallest_nucleus(candidates):
    # candidates=3 sorts only the 3 likeliest tokens: rows whose nucleus is larger take the full sort.
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(20, 9, generator=g, dtype=torch.float64) * torch.linspace(0.1, 6, 20, dtype=torch.float64)[:, None]
    for top_p in (0.05, 0.5, 0.9, 0.999):
        masked = top_p_mask(logits, top_p, candidates=candidates)
        for row, mrow in zip(logits, masked):
            probs = torch.softmax(row, -1).tolist()
            order = sorted(range(len(probs)), key=lambda i: -probs[i])
            keep, mass = set(), 0.0
            for i in order:  # add tokens until the mass reaches top_p
                keep.add(i)
                mass += probs[i]
                if mass >= top_p:
                    break
            assert {i for i in range(9) if mrow[i] > float("-inf")} == keep
    assert top_p_mask(logits, 1.0) is logits


def _u(seeds, step):
    return torch.from_numpy(uniforms(stream_keys(seeds), step))


def test_draws_follow_the_distribution_and_never_pick_a_zero_probability_token():
    # One stream's successive steps, all drawn at once.
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3, 0.0]], dtype=torch.float64)).expand(4000, -1)
    u = torch.from_numpy(uniforms(stream_keys([0] * 4000), np.arange(4000)))
    counts = torch.bincount(draw(logits, 1.0, u), minlength=4).double()
    assert counts[3] == 0
    torch.testing.assert_close(counts / 4000, torch.tensor([0.1, 0.6, 0.3, 0.0], dtype=torch.float64), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="one uniform per row"):
        draw(logits[:2], 1.0, u[:3])


def test_a_draw_at_temperature_zero_is_the_argmax():
    assert draw(torch.tensor([[0.0, 2.0, 1.0]]), 0.0, None).item() == 1


def test_draw_rows_do_not_depend_on_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g)
    seeds = stream_seeds(7, 6)
    together = draw(logits, 0.8, _u(seeds, 5))
    alone = torch.cat([draw(logits[i : i + 1], 0.8, _u(seeds[i : i + 1], 5)) for i in range(6)])
    assert torch.equal(together, alone)


def test_uniforms_are_uniform_and_a_function_of_stream_and_step():
    seeds = [0, 1, 2, 10**18, -5, 2**63 + 7]
    keys = stream_keys(seeds)
    steps = np.arange(20000)
    u = uniforms(np.repeat(keys, len(steps)), np.tile(steps, len(keys))).reshape(len(keys), -1)
    assert u.dtype == np.float64 and (u >= 0).all() and (u < 1).all()
    for row in u:  # each stream on its own: flat histogram, no correlation between successive steps
        assert np.abs(np.histogram(row, bins=10, range=(0, 1))[0] / len(row) - 0.1).max() < 0.01
        assert abs(np.corrcoef(row[:-1], row[1:])[0, 1]) < 0.03
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.03  # neighbouring seeds are unrelated streams
    # Row by row, in any order or batch, gives the same numbers: nothing is carried between calls.
    assert uniforms(keys[3:4], 17)[0] == u[3, 17] == uniforms(keys[::-1], 17)[2]
    assert len(set(u[:, 0].tolist())) == len(seeds)


def test_hinted_step_forced_lambda_picks_one_stream():
    h = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.1]])
    s = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    tokens, lam = hinted_step(
        h, s, beta=1000.0, top_p=1.0, temperature=0.0, u=None,
        force_lam=torch.tensor([0.0, 1.0, math.nan]),
    )
    assert tokens.tolist() == [0, 1, 2] and lam.tolist() == [0.0, 1.0, 1.0]


def test_plain_step_applies_temperature_before_top_p():
    # At temperature 1 the nucleus at 0.5 holds tokens 0 and 1; at temperature 0.1 only token 0.
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.25]]))
    assert {plain_step(logits, top_p=0.5, temperature=0.1, u=_u([0], k)).item() for k in range(50)} == {0}


def _brute_repetition_length(ids, window, count):
    for n in range(1, len(ids) + 1):
        prefix = ids[:n]
        windows = [tuple(prefix[i : i + window]) for i in range(n - window + 1)]
        if windows and max(windows.count(w) for w in windows) >= count:
            return n
    return None


def test_repetition_stop_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3) for _ in range(rng.randrange(1, 60))]
        window, count = rng.randrange(1, 5), rng.randrange(2, 5)
        assert repetition_length(ids, window, count) == _brute_repetition_length(ids, window, count)
    stop = RepetitionStop(2, 3)
    assert [stop.push(t) for t in [1, 2, 1, 2, 1, 2]] == [False, False, False, False, False, True]
