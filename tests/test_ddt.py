"""DDT scoring (docs/methods.md §1): exact statistics, the N(0, 1) calibration on the model's own
samples, rejection of off-policy text, batch/padding invariance, the report and the CLI."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from scipy import stats

from onpolicy_sft import cli, ddt, ddt_report
from onpolicy_sft.arith import arithmetic_splits
from onpolicy_sft.encoding import collate, encode_example, encode_prompt
from onpolicy_sft.ops import IGNORE_INDEX
from onpolicy_sft.rundir import InputsChanged
from tiny import make_tiny_model


# A random tiny model's next-token distributions are nearly uniform (entropy ≈ log V), so its
# samples and random text look alike. Scaling the final norm sharpens every distribution
# (logits ∝ the norm's weight) to an entropy of a couple of nats, so φ carries real signal.
SHARPEN = 6.0


def peaked_model(tokenizer, seed: int = 0):
    model = make_tiny_model(tokenizer, seed=seed)
    with torch.no_grad():
        model.model.norm.weight.mul_(SHARPEN)
    return model


def direct_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Row by row in float64 numpy, with the textbook formulas (variance as E[x²] − E[x]²)."""
    out = {k: [] for k in ("logp", "entropy", "phi", "varentropy")}
    for z, y in zip(logits.double().numpy(), labels.tolist()):
        logq = z - (z.max() + math.log(np.exp(z - z.max()).sum()))
        p = np.exp(logq)
        entropy = -(p * logq).sum()
        out["entropy"].append(entropy)
        out["varentropy"].append((p * logq**2).sum() - entropy**2)
        out["logp"].append(0.0 if y == IGNORE_INDEX else logq[y])
        out["phi"].append(0.0 if y == IGNORE_INDEX else logq[y] + entropy)
    return {k: np.array(v) for k, v in out.items()}


def direct_sequence_scores(model, input_ids, labels, attention_mask) -> dict[str, np.ndarray]:
    """Full logits from the model's own forward, shifted by hand, statistics in float64."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    out = {k: [] for k in ddt.SCORE_KEYS}
    for row_logits, row_labels in zip(logits, labels[:, 1:]):
        keep = row_labels != IGNORE_INDEX
        s = direct_token_stats(row_logits[keep], row_labels[keep])
        phi, n = s["phi"], int(keep.sum())
        z = phi.sum() / math.sqrt(s["varentropy"].sum())
        values = dict(phi_mean=phi.mean(), phi_sum=phi.sum(), z=z, pvalue=stats.norm.cdf(z),
                      frac_below_1=(phi < -1).mean(), frac_below_3=(phi < -3).mean(),
                      frac_below_5=(phi < -5).mean(), frac_positive=(phi > 0).mean(), n_tokens=n)
        for k, v in values.items():
            out[k].append(v)
    return {k: np.array(v) for k, v in out.items()}


EXAMPLES = [
    ("What is 2 + 3?", "2 + 3 = 5. #### 5"),
    ("Say hi.", "hi"),
    ("Count to four, please, and explain nothing else.", "1 2 3 4, done; that is all there is to say."),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_token_stats_match_direct_float64(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 40, generator=g) * 3).to(dtype)
    logits[3, 5:] = -30.0  # a nearly one-hot row
    labels = torch.randint(0, 40, (16,), generator=g)
    labels[[2, 9]] = IGNORE_INDEX
    got = ddt.token_stats(logits, labels)
    want = direct_token_stats(logits, labels)
    for field in ("logp", "entropy", "phi", "varentropy"):
        value = getattr(got, field)
        assert value.dtype in (torch.float32, torch.float64)
        np.testing.assert_allclose(value.double().numpy(), want[field], rtol=1e-5, atol=2e-5, err_msg=field)


def test_sequence_scores_match_full_logits(tiny_tokenizer):
    model = peaked_model(tiny_tokenizer)
    batch = collate([encode_example(tiny_tokenizer, p, r) for p, r in EXAMPLES], tiny_tokenizer.pad_token_id)
    # chunk_tokens=7 splits the response positions across several lm_head chunks.
    got = ddt.sequence_scores(model, batch["input_ids"], batch["labels"], batch["attention_mask"], chunk_tokens=7)
    want = direct_sequence_scores(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert got["n_tokens"].tolist() == want["n_tokens"].tolist()
    assert got["pvalue"].dtype == torch.float64
    for key in ddt.SCORE_KEYS:
        np.testing.assert_allclose(got[key].double().numpy(), want[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_no_response_tokens_gives_nan(tiny_tokenizer, tiny_model):
    ids = torch.tensor([[5, 6, 7, 8]])
    got = ddt.sequence_scores(tiny_model, ids, torch.full_like(ids, IGNORE_INDEX))
    assert got["n_tokens"].item() == 0 and math.isnan(got["phi_mean"].item()) and math.isnan(got["z"].item())


def _sample(model, prompt_ids: list[int], n_rows: int, n_new: int, seed: int) -> torch.Tensor:
    """Pure temperature-1 ancestral sampling over the full vocabulary (no top-k, no top-p)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids] * n_rows)
    step_input, cache = ids, None
    with torch.no_grad():
        for _ in range(n_new):
            out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step_input = torch.multinomial(torch.softmax(out.logits[:, -1].double(), dim=-1), 1, generator=g)
            ids = torch.cat([ids, step_input], dim=1)
    return ids


def _score_continuations(model, ids: torch.Tensor, prompt_len: int) -> dict[str, torch.Tensor]:
    labels = ids.clone()
    labels[:, :prompt_len] = IGNORE_INDEX
    return ddt.sequence_scores(model, ids, labels)


@pytest.fixture(scope="module")
def own_and_foreign(tiny_tokenizer):
    model = peaked_model(tiny_tokenizer, seed=0)
    prompt = encode_prompt(tiny_tokenizer, "Tell me something.")
    n_rows, n_new = 200, 24
    own = _sample(model, prompt, n_rows, n_new, seed=1)
    other = _sample(peaked_model(tiny_tokenizer, seed=1), prompt, n_rows, n_new, seed=2)
    g = torch.Generator().manual_seed(3)
    printable = torch.tensor(tiny_tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz 0123456789.,")))
    noise = torch.cat([own[:, : len(prompt)], printable[torch.randint(len(printable), (n_rows, n_new), generator=g)]], 1)
    return model, len(prompt), {"own": own, "other_model": other, "random": noise}


def test_own_samples_are_calibrated(own_and_foreign):
    model, prompt_len, texts = own_and_foreign
    own = texts["own"]
    # The samples must be genuinely random, not one memorised string: otherwise the test is void.
    assert len({tuple(r) for r in own[:, prompt_len:].tolist()}) == len(own)
    assert len(set(own[:, prompt_len:].flatten().tolist())) > 20
    scores = _score_continuations(model, own, prompt_len)
    with torch.no_grad():
        logits = model(input_ids=own).logits[:, prompt_len - 1 : -1].reshape(-1, model.config.vocab_size)
    entropy = ddt.token_stats(logits, own[:, prompt_len:].reshape(-1)).entropy
    assert 0.5 < entropy.mean().item() < 0.8 * math.log(model.config.vocab_size)

    z = scores["z"].double().numpy()
    assert stats.kstest(z, "norm").pvalue > 0.01
    phi_mean = scores["phi_mean"].double().numpy()
    # Equal lengths: the corpus mean is the mean of row means; E[φ] = 0 exactly for own samples.
    assert abs(phi_mean.mean()) < 4 * phi_mean.std(ddof=1) / math.sqrt(len(phi_mean))
    assert abs(phi_mean.mean()) < 0.05
    reject = (scores["pvalue"] < 0.01).double().mean().item()
    assert reject < 0.05


@pytest.mark.parametrize("kind, max_phi, min_reject", [("random", -1.0, 0.9), ("other_model", -0.2, 0.1)])
def test_off_policy_text_scores_negative_and_is_rejected(own_and_foreign, kind, max_phi, min_reject):
    """Random characters are far off; another random model's samples are subtler (tied embeddings
    give both tiny models a shared bias towards repeating the last token) but still rejected as a
    corpus: Z's distribution is nowhere near N(0, 1), and rows are rejected far above the 1% rate."""
    model, prompt_len, texts = own_and_foreign
    scores = _score_continuations(model, texts[kind], prompt_len)
    own = _score_continuations(model, texts["own"], prompt_len)
    assert scores["phi_mean"].mean().item() < max_phi
    assert scores["phi_mean"].mean().item() < own["phi_mean"].mean().item() + max_phi
    assert (scores["pvalue"] < 0.01).double().mean().item() > min_reject
    assert stats.kstest(scores["z"].double().numpy(), "norm").pvalue < 1e-6


def test_scores_independent_of_batch_mates_and_padding(tiny_tokenizer):
    model = peaked_model(tiny_tokenizer)
    rows = [encode_example(tiny_tokenizer, p, r) for p, r in EXAMPLES]
    pad = tiny_tokenizer.pad_token_id

    def run(batch_rows, side):
        b = collate(batch_rows, pad, padding_side=side)
        return ddt.sequence_scores(model, b["input_ids"], b["labels"], b["attention_mask"], chunk_tokens=5)

    alone = [run([r], "right") for r in rows]
    long_mate = encode_example(tiny_tokenizer, "x" * 60, "y" * 40)
    for side in ("right", "left"):
        together = run(rows, side)
        shuffled = run([rows[2], long_mate, rows[0], rows[1]], side)
        for i, j in ((0, 2), (1, 3), (2, 0)):
            for key in ddt.SCORE_KEYS:
                a = alone[i][key].double()
                torch.testing.assert_close(together[key][i].double(), a[0], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(shuffled[key][j].double(), a[0], rtol=1e-4, atol=1e-5)


def test_plan_batches_covers_rows_within_budget():
    lengths = [5, 40, 12, 12, 3, 100, 7, 40]
    batches = ddt.plan_batches(lengths, batch_tokens=48)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 48
    assert batches[0] == [5]  # the over-long row alone, first


def _dataset(examples):
    return datasets.Dataset.from_dict({
        "id": [f"r{i}" for i in range(len(examples))],
        "prompt": [p for p, _ in examples],
        "response": [r for _, r in examples],
    })


def test_score_keeps_order_and_matches_sequence_scores(tiny_tokenizer):
    model = peaked_model(tiny_tokenizer)
    examples = EXAMPLES + [("Another one?", "Yes, " * k) for k in (1, 6, 3)]
    dataset = _dataset(examples)
    small = ddt.score(model, tiny_tokenizer, dataset, batch_tokens=64, per_token=True, progress=False)
    large = ddt.score(model, tiny_tokenizer, dataset, batch_tokens=10_000, progress=False)
    assert small["id"] == dataset["id"]
    for i, (p, r) in enumerate(examples):
        b = collate([encode_example(tiny_tokenizer, p, r)], tiny_tokenizer.pad_token_id)
        want = ddt.sequence_scores(model, b["input_ids"], b["labels"])
        for key in ddt.SCORE_KEYS:
            assert small[i]["ddt_" + key] == pytest.approx(want[key].item(), rel=1e-4, abs=1e-5)
            assert large[i]["ddt_" + key] == pytest.approx(want[key].item(), rel=1e-4, abs=1e-5)
        assert len(small[i]["ddt_phi"]) == small[i]["ddt_n_tokens"]
        assert np.mean(small[i]["ddt_phi"]) == pytest.approx(small[i]["ddt_phi_mean"], rel=1e-5, abs=1e-6)
    again = ddt.score(model, tiny_tokenizer, small, progress=False)  # rescoring replaces the columns
    assert again["ddt_z"] == pytest.approx(large["ddt_z"], rel=1e-5)
    assert "ddt_phi" not in again.column_names


def _scored(phi_mean, n_tokens, z, frac_below_1=None):
    n = len(phi_mean)
    zero = [0.0] * n
    return datasets.Dataset.from_dict({
        "ddt_phi_mean": phi_mean, "ddt_phi_sum": [m * k for m, k in zip(phi_mean, n_tokens)],
        "ddt_z": z, "ddt_pvalue": stats.norm.cdf(z).tolist(), "ddt_n_tokens": n_tokens,
        "ddt_frac_below_1": frac_below_1 or zero, "ddt_frac_below_3": zero, "ddt_frac_below_5": zero,
        "ddt_frac_positive": zero,
    })


def test_summary_weights_token_statistics_by_length_and_pools_z_by_stouffer():
    scored = _scored([0.1, -0.5, -2.0, 0.0], [10, 30, 20, 40], [0.5, -3.0, -1.0, 0.0], [0.0, 0.5, 0.25, 0.0])
    s = ddt.summarize(scored)
    assert s["n"] == 4 and s["n_tokens"] == 100
    assert s["phi_mean"] == pytest.approx(-0.6)
    assert s["phi_median"] == pytest.approx(-0.25)
    assert s["phi_token_mean"] == pytest.approx((1 - 15 - 40 + 0) / 100)
    assert s["frac_below_1"] == pytest.approx((15 + 5) / 100)
    assert s["reject_rate_1pct"] == pytest.approx(0.25)  # only Z = −3 has Φ(Z) < 0.01
    assert s["corpus_z"] == pytest.approx(-3.5 / 2)
    assert s["corpus_pvalue"] == pytest.approx(stats.norm.cdf(-1.75))
    assert all(isinstance(v, (int, float)) for v in s.values())
    json.dumps(s)


def test_report_has_a_column_per_corpus_and_embeds_both_plots(tmp_path):
    rng = np.random.default_rng(0)
    original = _scored(rng.normal(-0.6, 0.2, 50).tolist(), [30] * 50, rng.normal(-6, 2, 50).tolist())
    rewritten = _scored(rng.normal(-0.03, 0.05, 40).tolist(), [30] * 40, rng.normal(0, 1, 40).tolist())
    path = ddt_report.write_report(tmp_path / "r", {"original": original, "rewritten": rewritten})
    text = path.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| statistic"))
    assert header.split("|")[2:4] == [" original ", " rewritten "]
    assert f"{ddt.summarize(original)['phi_mean']:+.4f}" in text
    for png in (ddt_report.PHI_HIST, ddt_report.Z_PLOT):
        assert f"]({png})" in text
        assert (path.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_score_writes_both_corpora_scored_with_summary_and_report(tmp_path, tiny_tokenizer, capsys):
    model_dir = tmp_path / "tiny"
    peaked_model(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "scored"
    rc = cli.main(["score", "--model", str(model_dir), "--data", "arithmetic", "--compare", "arithmetic",
                   "--split", "test", "--limit", "4", "--out", str(out), "--batch-tokens", "512"])
    assert rc == 0

    scored = datasets.Dataset.from_parquet(str(out / "scored.parquet"))
    assert len(scored) == 4 and "ddt_phi_mean" in scored.column_names
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["arithmetic/test", "arithmetic/test (compare)"]
    assert summary["arithmetic/test"]["phi_mean"] == pytest.approx(float(np.mean(scored["ddt_phi_mean"])))
    assert (out / "scored_compare.parquet").exists() and (out / "report.md").exists()
    assert "mean φ" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_merge_in_input_order(tmp_path, tiny_tokenizer):
    """torchrun with 2 CPU processes (gloo): each scores its share, the result equals one process's."""
    model_dir = tmp_path / "tiny"
    peaked_model(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    args = ["score", "--model", str(model_dir), "--data", "arithmetic", "--limit", "10", "--batch-tokens", "256"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two_run = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "onpolicy_sft", *args,
                              "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True, text=True,
                             timeout=300)
    one_run = subprocess.run([sys.executable, "-m", "onpolicy_sft", *args, "--out", str(tmp_path / "one")],
                             check=True, env=env, capture_output=True, text=True, timeout=300)

    def bar_total(stderr: str) -> int:  # the main process's bar counts the rows of every process
        return int(re.findall(r"DDT scoring: 100%.*?\| \d+/(\d+)", stderr)[-1])

    assert bar_total(two_run.stderr) == bar_total(one_run.stderr) == 10
    one = datasets.Dataset.from_parquet(str(tmp_path / "one" / "scored.parquet"))
    two = datasets.Dataset.from_parquet(str(tmp_path / "two" / "scored.parquet"))
    assert two["id"] == one["id"]
    for key in ddt.SCORE_KEYS:
        assert two["ddt_" + key] == pytest.approx(one["ddt_" + key], rel=1e-6, abs=1e-7)


@pytest.mark.embedded
def test_embedded_prefers_its_own_greedy_answers(embedded):
    model, tokenizer = embedded
    rows = arithmetic_splits(n_train=4, n_test=1, n_test_hard=1)["train"]
    prompts = [encode_prompt(tokenizer, p) for p in rows["prompt"]]
    # One left-padded batch of greedy answers.
    batch = collate([{"input_ids": p, "labels": p} for p in prompts], tokenizer.pad_token_id, padding_side="left")
    mask = batch["attention_mask"]
    out = model.generate(input_ids=batch["input_ids"], attention_mask=mask, max_new_tokens=48, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    greedy = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    references = ddt.score(model, tokenizer, rows, progress=False)
    own = ddt.score(model, tokenizer, rows.remove_columns("response").add_column("response", greedy), progress=False)
    for ref_phi, own_phi in zip(references["ddt_phi_mean"], own["ddt_phi_mean"]):
        assert own_phi > ref_phi
    assert np.mean(references["ddt_phi_mean"]) < -0.1


def test_truncated_responses_are_scored_without_the_end_of_turn(tiny_model, tiny_tokenizer):
    rows = [{"prompt": "2+2?", "response": "four, I", "response_truncated": flag} for flag in (False, True)]
    scored = ddt.score(tiny_model, tiny_tokenizer, datasets.Dataset.from_list(rows), per_token=True, progress=False)
    full, cut = scored["ddt_phi"]
    assert list(scored["ddt_n_tokens"]) == [len(full), len(cut)] and len(full) == len(cut) + 1
    assert cut == pytest.approx(full[:-1], abs=1e-5)  # the same tokens, less the end-of-turn φ


LONG = [("Short?", "yes"), ("Tell me a long story.", "once upon a time " * 30), ("Medium?", "a few words here")]


@pytest.mark.parametrize("on_long", ["truncate", "skip"])
def test_score_caps_long_rows_and_counts_them(tiny_tokenizer, on_long):
    model = peaked_model(tiny_tokenizer)
    dataset = _dataset(LONG + [("x" * 80, "too late")])
    lengths = [len(encode_example(tiny_tokenizer, p, r)["input_ids"]) for p, r in LONG + [("x" * 80, "too late")]]
    prompt_len = len(encode_prompt(tiny_tokenizer, "x" * 80))
    max_length = 60
    assert lengths[0] <= max_length < lengths[1] and prompt_len >= max_length and lengths[2] <= max_length
    scored = ddt.score(model, tiny_tokenizer, dataset, max_length=max_length, on_long=on_long, per_token=True,
                       progress=False)
    want_cut = "truncated" if on_long == "truncate" else "skipped_overlong"
    assert scored["ddt_cut"] == ["", want_cut, "", "skipped_prompt_too_long"]
    summary = ddt.summarize(scored)
    assert (summary["n_truncated"], summary["n_skipped"]) == ((1, 1) if on_long == "truncate" else (0, 2))
    assert scored["ddt_n_tokens"][3] == 0 and math.isnan(scored["ddt_phi_mean"][3])
    full = ddt.score(model, tiny_tokenizer, dataset.select([1]), per_token=True, progress=False)
    if on_long == "truncate":
        kept = max_length - len(encode_prompt(tiny_tokenizer, LONG[1][0]))
        assert scored["ddt_n_tokens"][1] == kept
        # Causal: the kept tokens score exactly as they do in the full row.
        assert scored["ddt_phi"][1] == pytest.approx(full["ddt_phi"][0][:kept], abs=1e-5)
    else:
        assert scored["ddt_n_tokens"][1] == 0 and math.isnan(scored["ddt_z"][1])
    for i in (0, 2):  # rows within the limit are untouched
        alone = ddt.score(model, tiny_tokenizer, dataset.select([i]), progress=False)
        assert scored["ddt_phi_mean"][i] == pytest.approx(alone["ddt_phi_mean"][0], rel=1e-5)
    assert summary["n_tokens"] == sum(scored["ddt_n_tokens"])


class Killed(Exception):
    """Stands in for a kill in the middle of scoring."""


def test_killed_scoring_resumes_with_the_same_scores(tmp_path, tiny_tokenizer, monkeypatch):
    model = peaked_model(tiny_tokenizer)
    examples = EXAMPLES + LONG + [("Another one?", "Yes, " * k) for k in (1, 6, 3)]
    dataset = _dataset(examples)
    options = {"batch_tokens": 48, "per_token": True, "progress": False, "max_length": 60}
    whole = ddt.score(model, tiny_tokenizer, dataset, **options)

    real, calls, die_at = ddt._score_batch, [], [3]

    def dies_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) in die_at:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(ddt, "_score_batch", dies_on_the_third_batch)
    with pytest.raises(Killed):
        ddt.score(model, tiny_tokenizer, dataset, out_dir=tmp_path / "run", **options)
    assert len(list((tmp_path / "run" / "shards").glob("*.json"))) == 2
    calls.clear()
    die_at.clear()
    resumed = ddt.score(model, tiny_tokenizer, dataset, out_dir=tmp_path / "run", **options)
    n_batches = len(list((tmp_path / "run" / "shards").glob("*.json")))
    assert len(calls) == n_batches - 2 > 0  # only the missing batches were scored again
    assert resumed.column_names == whole.column_names
    for column in whole.column_names:  # bit-identical, NaN of the unscored row included
        if column.startswith("ddt_") and column not in ("ddt_phi", "ddt_cut"):
            assert np.array_equal(np.asarray(resumed[column], float), np.asarray(whole[column], float), equal_nan=True)
        else:
            assert resumed[column] == whole[column], column
    record = json.loads((tmp_path / "run" / "scoring.json").read_text())
    assert record["rows"] == len(dataset) and record["skipped_prompt_too_long"] == 1
    assert record["processes"] == 1 and record["rows_per_process"] == [len(dataset) - 1]


    with pytest.raises(InputsChanged, match="max_length"):
        ddt.score(model, tiny_tokenizer, dataset, out_dir=tmp_path / "run", **{**options, "max_length": 50})
    with pytest.raises(InputsChanged, match="model_weights"):
        ddt.score(peaked_model(tiny_tokenizer, seed=1), tiny_tokenizer, dataset, out_dir=tmp_path / "run", **options)


def test_unwritable_output_fails_before_any_scoring(tmp_path, tiny_tokenizer, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    calls = []
    monkeypatch.setattr(ddt, "_score_batch", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(ddt, "_encode", lambda *a, **k: calls.append(1))
    with pytest.raises(OSError):  # the directory cannot even be made, let alone locked
        ddt.score(peaked_model(tiny_tokenizer), tiny_tokenizer, _dataset(EXAMPLES), out_dir=blocker / "out",
                  progress=False)
    assert calls == []


def test_off_distribution_flags_rows_below_the_level_and_unscored_rows():
    from datasets import Dataset

    scored = Dataset.from_dict({"ddt_pvalue": [0.5, 0.001, float("nan"), 0.01],
                                "ddt_phi_mean": [0.0, -0.3, float("nan"), -0.1]})
    assert ddt.off_distribution(scored, "p_value", 0.01) == [False, True, True, False]
    assert ddt.off_distribution(scored, "phi", -0.1) == [False, True, True, False]


def _huge_text(chars: int, seed: int = 0) -> str:
    """Words, numbers, punctuation, non-ASCII and long runs without a space, as real text has."""
    rng = np.random.default_rng(seed)
    pieces = ["the", "answer", "is", "12345", "Zahl", "été", "数学", "—", "x" * 300, "\n\n", "#### 7", "  ", "é" * 50]
    out, n = [], 0
    while n < chars:
        piece = pieces[rng.integers(len(pieces))] + (" " if rng.random() < 0.7 else "")
        out.append(piece)
        n += len(piece)
    return "".join(out)


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_a_huge_row_is_tokenised_only_up_to_a_bound_with_the_same_first_ids(tiny_tokenizer, which, monkeypatch):
    """The score's cap bounds what is tokenised (hence memory), not the raw row, and cutting the text
    first changes none of the ids kept."""
    from onpolicy_sft import encoding
    from onpolicy_sft.models import load_tokenizer

    tokenizer = tiny_tokenizer if which == "tiny" else load_tokenizer("smollm2-135m-instruct")
    cap = 512
    bound = encoding.text_bound(tokenizer, cap + 1)  # score reads one token past the cap to tell a long row
    rows = [("Sum these: " + _huge_text(3 * bound, seed=1), "short answer"),  # the prompt alone is over the cap
            ("What is 3 + 4?", _huge_text(3 * bound, seed=2))]
    whole = [encode_example(tokenizer, p, r) for p, r in rows]
    assert all(len(w["input_ids"]) > 3 * cap for w in whole)

    tokenised = []
    real_encode_text = encoding.encode_text
    monkeypatch.setattr(encoding, "encode_text", lambda tok, text: tokenised.append(len(text)) or real_encode_text(tok, text))
    encoded, cuts = ddt._encode(tokenizer, _dataset(rows), "response", cap, "truncate")
    assert max(tokenised) <= bound < len(rows[1][1]) / 2
    assert cuts == ["skipped_prompt_too_long", "truncated"] and encoded[0] is None
    assert encoded[1]["input_ids"] == whole[1]["input_ids"][:cap]
    assert encoded[1]["labels"] == whole[1]["labels"][:cap]
    # A row the cap does not reach is encoded whole, end-of-turn included.
    short = ddt._encode(tokenizer, _dataset([("What is 3 + 4?", "7")]), "response", cap, "truncate")[0][0]
    assert short == encode_example(tokenizer, "What is 3 + 4?", "7")


def test_score_refuses_a_directory_another_stage_holds_and_never_writes_through_a_link(tmp_path, tiny_tokenizer,
                                                                                       capsys):
    from onpolicy_sft.rundir import RunLock

    model_dir = tmp_path / "tiny"
    peaked_model(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "scored"
    args = ["score", "--model", str(model_dir), "--data", "arithmetic", "--split", "test", "--limit", "2",
            "--out", str(out)]
    with RunLock(out, "train"):
        before = sorted(p.name for p in out.iterdir())
        code = subprocess.run([sys.executable, "-m", "onpolicy_sft", *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert code.returncode == 1 and f"in use by another stage (train, pid {os.getpid()})" in code.stderr
    assert sorted(p.name for p in out.iterdir()) == before  # nothing scored, nothing written
    outside = tmp_path / "outside.md"
    outside.write_text("precious")
    (out / "report.md").symlink_to(outside)
    assert cli.main(args) == 0
    capsys.readouterr()
    assert outside.read_text() == "precious" and not (out / "report.md").is_symlink()
    assert "mean φ" in (out / "report.md").read_text()
