"""Evaluation: unbiased pass@k, accuracy/avg@k/SE through a backend, forgetting KL vs full logits."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import datasets
import pytest
import torch

from onpolicy_sft.config import EvalConfig
from onpolicy_sft.encoding import encode_prompt
from onpolicy_sft.evaluate import evaluate, forgetting, mean_and_se, pass_at_k
from tiny import make_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64])
def test_pass_at_k_matches_exact_binomials(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, 1) == 1.0


def test_pass_at_k_is_stable_for_large_n_and_rejects_bad_input():
    assert pass_at_k(10_000, 1, 1) == pytest.approx(1e-4, rel=1e-9)
    assert 0.0 <= pass_at_k(5000, 2500, 100) <= 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_standard_error_uses_the_sample_variance():
    mean, se = mean_and_se([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75
    assert se == pytest.approx(math.sqrt(0.25 / 4))  # sample variance 1/4, n = 4


class ScriptedBackend:
    """Returns scripted completions: greedy answers, then per-prompt sample lists."""

    def __init__(self, tokenizer, greedy, samples):
        self.tok, self.greedy, self.samples, self.calls = tokenizer, greedy, samples, []

    def _ids(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]

    def sample(self, prompt_ids, config, seeds=None):
        self.calls.append(config)
        if config.temperature == 0:
            return [[self._ids(t)] for t in self.greedy]
        return [[self._ids(t) for t in row] for row in self.samples]

    def close(self):
        pass


def test_evaluate_accuracy_avg_pass_and_per_example_file(tiny_tokenizer, tmp_path):
    ds = datasets.Dataset.from_list(
        [{"id": f"q{i}", "prompt": f"what is {i}+1?", "answer": str(i + 1)} for i in range(3)]
    )
    greedy = ["so \\boxed{1}", "\\boxed{7}", "no idea"]  # correct, wrong, wrong
    samples = [["\\boxed{1}"] * 4, ["\\boxed{2}", "\\boxed{0}", "x", "\\boxed{2}"], ["\\boxed{9}"] * 4]
    backend = ScriptedBackend(tiny_tokenizer, greedy, samples)
    with pytest.raises(ValueError, match=r"pass_k: pass@8 needs eval.n_samples >= 8, but n_samples is 4"):
        EvalConfig(n_samples=4, pass_k=[1, 2, 8])  # k > n is not estimable: refused, not left out of the table
    config = EvalConfig(n_samples=4, temperature=1.0, pass_k=[1, 2], max_new_tokens=16)
    metrics = evaluate_with(ds, backend, config, tmp_path)
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["accuracy_se"] == pytest.approx(mean_and_se([1.0, 0.0, 0.0])[1])
    assert metrics["avg@4"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["pass@1"] == pytest.approx(metrics["avg@4"])  # pass@1 is the mean accuracy
    assert metrics["pass@2"] == pytest.approx((1 + (1 - 1 / 6) + 0) / 3)  # C(2,2)/C(4,2) = 1/6
    assert [c.temperature for c in backend.calls] == [0.0, 1.0] and backend.calls[1].n == 4
    lines = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in lines] == [True, False, False]
    assert [r["samples_correct"] for r in lines] == [4, 2, 0]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def evaluate_with(ds, backend, config, out_dir):
    return evaluate(None, backend.tok, ds, config, backend=backend, out_dir=out_dir)


def test_evaluate_rejects_missing_answer_column(tiny_tokenizer):
    ds = datasets.Dataset.from_list([{"prompt": "x"}])
    with pytest.raises(ValueError, match="answer"):
        evaluate(None, tiny_tokenizer, ds, EvalConfig(), backend=ScriptedBackend(tiny_tokenizer, [], []))


def _independent_kl(base, tuned, tokenizer, prompt, response):
    p = encode_prompt(tokenizer, prompt)
    ids = torch.tensor([p + response])
    with torch.no_grad():
        lb = torch.log_softmax(base(ids).logits[0].double(), -1)
        lt = torch.log_softmax(tuned(ids).logits[0].double(), -1)
    rows = slice(len(p) - 1, ids.shape[1] - 1)  # positions that predict the response tokens
    return (lb[rows].exp() * (lb[rows] - lt[rows])).sum(-1)


def test_forgetting_matches_full_logit_kl(tiny_tokenizer):
    base = make_tiny_model(tiny_tokenizer, seed=0)
    tuned = make_tiny_model(tiny_tokenizer, seed=1)
    prompts = ["write a poem", "name a colour", "hello there, friend"]
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(10, 90, (n,), generator=g).tolist() for n in (5, 9, 2)]
    out = forgetting(base, tuned, tiny_tokenizer, prompts, responses=responses, batch_size=2, chunk_tokens=3)
    per = [_independent_kl(base, tuned, tiny_tokenizer, p, r) for p, r in zip(prompts, responses)]
    assert out["n_tokens"] == 16 and out["n_prompts"] == 3
    assert out["kl"] == pytest.approx(float(torch.cat(per).mean()), rel=1e-5)
    means = [float(v.mean()) for v in per]
    assert out["kl_prompt_mean"] == pytest.approx(sum(means) / 3, rel=1e-5)
    assert out["kl_se"] == pytest.approx(mean_and_se(means)[1], rel=1e-4)
    same = forgetting(base, base, tiny_tokenizer, prompts, responses=responses)
    assert abs(same["kl"]) < 1e-6


def test_forgetting_generates_base_answers_when_not_given(tiny_tokenizer):
    base = make_tiny_model(tiny_tokenizer, seed=0)
    out = forgetting(base, make_tiny_model(tiny_tokenizer, seed=3), tiny_tokenizer, ["hi", "bye"], max_new_tokens=4)
    assert out["n_prompts"] == 2 and 2 <= out["n_tokens"] <= 8 and out["kl"] > 0
