"""Preference pairs: the pair-building rules on scripted samples, the cached reference log-probs
against full float64 logits, and DPO/SimPO training on a tiny model widening the margin."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from decoding.backend import Backend
from decoding.reference import reference_sample
from decoding.sampling import SamplingConfig
from onpolicy_sft import cli, ddt, preference_pairs
from onpolicy_sft.config import LoopConfig, ModelConfig, ObjectiveConfig, TrainConfig
from onpolicy_sft.config_io import save_config
from onpolicy_sft.encoding import encode_example, encode_prompt
from onpolicy_sft.loaders import read_preferences
from onpolicy_sft.train_data import tokenize_for_training
from onpolicy_sft.models import load_model
from onpolicy_sft.preference_pairs import add_reference_logps, build_pairs
from onpolicy_sft.train import train
from tiny import make_tiny_model


class ScriptedBackend(Backend):
    """Returns fixed completions per prompt (by position), and records the sampling config it got."""

    name = "scripted"

    def __init__(self, tokenizer, completions: list[list[str]]):
        self.tokenizer, self.completions, self.configs = tokenizer, completions, []

    def sample(self, prompt_ids, config, seeds=None):
        self.configs.append(config)
        assert len(prompt_ids) == len(self.completions)
        eos = self.tokenizer.eos_token_id
        return [[self.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts[: config.n]]
                for texts in self.completions]

    def two_stream(self, hinted_ids, student_ids, config, tokenizer=None):
        raise NotImplementedError

    def update_weights(self, model):
        raise NotImplementedError


def _prompts():
    return datasets.Dataset.from_list([
        {"id": "mixed", "prompt": "2+3?", "response": "2+3=5 \\boxed{5}", "answer": "5", "system": ""},
        {"id": "wrong", "prompt": "4+4?", "response": "4+4=8 \\boxed{8}", "answer": "8", "system": ""},
        {"id": "right", "prompt": "1+1?", "response": "1+1=2 \\boxed{2}", "answer": "2", "system": ""},
        {"id": "mixed2", "prompt": "3*3?", "response": "3*3=9 \\boxed{9}", "answer": "9", "system": ""},
    ])


SAMPLES = [
    ["I think \\boxed{6}", "so \\boxed{5}", "\\boxed{5} again", "no answer"],
    ["\\boxed{7}", "maybe \\boxed{9}", "nothing", "\\boxed{88}"],
    ["\\boxed{2}", "it is \\boxed{2}", "\\boxed{2} done", "\\boxed{2}"],
    ["\\boxed{9}", "\\boxed{10}", "\\boxed{9}", "\\boxed{9}"],
]


def test_pairs_follow_the_rules_with_demonstration_fallback(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, SAMPLES)
    pairs, counts = build_pairs(None, tiny_tokenizer, _prompts(), k=4, backend=backend, seed=7)
    (config,) = backend.configs
    assert (config.n, config.temperature, config.top_p, config.seed) == (4, 1.0, 1.0, 7)
    rows = {r["id"]: r for r in pairs}
    assert list(rows) == ["mixed", "wrong", "mixed2"]  # all-correct prompt has nothing to reject
    assert rows["mixed"]["chosen"] == "so \\boxed{5}" and rows["mixed"]["rejected"] == "I think \\boxed{6}"
    assert rows["mixed"]["pair_source"] == "samples" and rows["mixed"]["n_correct"] == 2
    assert rows["wrong"]["chosen"] == "4+4=8 \\boxed{8}" and rows["wrong"]["rejected"] == "\\boxed{7}"
    assert rows["wrong"]["pair_source"] == "demonstration" and rows["wrong"]["n_correct"] == 0
    assert rows["mixed2"]["chosen"] == "\\boxed{9}" and rows["mixed2"]["rejected"] == "\\boxed{10}"
    assert all(r["answer"] == p["answer"] and r["prompt"] == p["prompt"] for r in pairs for p in _prompts() if p["id"] == r["id"])
    assert counts == {"prompts": 4, "samples": 16, "correct_samples": 2 + 0 + 4 + 3, "mixed": 2, "all_incorrect": 1,
                      "all_correct": 1, "kept": 3, "dropped": 1, "processes": 1, "rows_per_process": [4]}


def test_pairs_drop_prompts_without_a_mixed_pair(tiny_tokenizer):
    data = _prompts().remove_columns("response")  # dropping needs no demonstrations
    pairs, counts = build_pairs(None, tiny_tokenizer, data, k=4, backend=ScriptedBackend(tiny_tokenizer, SAMPLES),
                                no_pair="drop")
    assert pairs["id"] == ["mixed", "mixed2"] and set(pairs["pair_source"]) == {"samples"}
    assert (counts["kept"], counts["dropped"], counts["all_incorrect"], counts["all_correct"]) == (2, 2, 1, 1)


def test_pairs_use_only_k_samples_and_reject_bad_settings(tiny_tokenizer):
    # with k = 2 the first prompt sees "\boxed{6}" and "\boxed{5}" (mixed); the last sees 9, 10 (mixed)
    pairs, counts = build_pairs(None, tiny_tokenizer, _prompts(), k=2, backend=ScriptedBackend(tiny_tokenizer, SAMPLES))
    assert counts["samples"] == 8 and counts["mixed"] == 2
    with pytest.raises(ValueError, match="no_pair"):
        build_pairs(None, tiny_tokenizer, _prompts(), k=4, backend=ScriptedBackend(tiny_tokenizer, SAMPLES), no_pair="x")
    with pytest.raises(ValueError, match="response"):
        build_pairs(None, tiny_tokenizer, _prompts().remove_columns("response"), k=4,
                    backend=ScriptedBackend(tiny_tokenizer, SAMPLES))
    with pytest.raises(ValueError, match="k must be"):
        build_pairs(None, tiny_tokenizer, _prompts(), k=1, backend=ScriptedBackend(tiny_tokenizer, SAMPLES))


def test_pairs_from_real_sampling_on_a_tiny_model(tiny_model, tiny_tokenizer):
    """The hf backend end to end: the rejected side is the model's own first sample, drawn from the
    stream one plain sampling loop over all prompts gives that row (decoding.reference, no batching);
    a random model never answers, so each chosen side is the demonstration."""
    sampling = SamplingConfig(max_new_tokens=5)
    pairs, counts = build_pairs(tiny_model, tiny_tokenizer, _prompts(), k=2, sampling=sampling, seed=3)
    prompts = [encode_prompt(tiny_tokenizer, p) for p in _prompts()["prompt"]]
    oracle = reference_sample(tiny_model, prompts, SamplingConfig(n=2, max_new_tokens=5, seed=3), tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert counts["all_incorrect"] == counts["kept"] == 4 and counts["samples"] == 8
    assert pairs["chosen"] == _prompts()["response"] and set(pairs["pair_source"]) == {"demonstration"}
    assert pairs["rejected"] == [tiny_tokenizer.decode(o[0], skip_special_tokens=True) for o in oracle]
    assert pairs["rejected_truncated"] == [len(o[0]) == 5 and o[0][-1] != eos for o in oracle]
    assert len(set(pairs["rejected"])) == 4  # no two prompts share a stream
    other, _ = build_pairs(tiny_model, tiny_tokenizer, _prompts(), k=2, sampling=sampling, seed=4)
    assert other["rejected"] != pairs["rejected"]


def _independent_logp(model, tokenizer, prompt, response, max_length):
    enc = encode_example(tokenizer, prompt, response, max_length=max_length)
    ids = torch.tensor([enc["input_ids"]])
    labels = torch.tensor(enc["labels"][1:])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    keep = labels != -100
    return float(logp[keep].gather(-1, labels[keep].unsqueeze(-1)).sum())


def test_reference_logps_match_full_logits_in_float64(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=3, dtype=torch.float64)
    pairs = datasets.Dataset.from_list([
        {"prompt": "2+3?", "system": "", "chosen": "\\boxed{5}", "rejected": "I think it is \\boxed{6}"},
        {"prompt": "a much longer prompt here?", "system": "", "chosen": "yes", "rejected": "n"},
        {"prompt": "x", "system": "", "chosen": "a fairly long chosen answer to be truncated", "rejected": "b"},
    ])
    out = add_reference_logps(model, tiny_tokenizer, pairs, max_length=40, batch_size=2)
    for row in out:
        for side in ("chosen", "rejected"):
            expected = _independent_logp(model, tiny_tokenizer, row["prompt"], row[side], 40)
            assert row[f"ref_{side}_logp"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert len(row["chosen_input_ids"]) <= 40
    again = add_reference_logps(model, tiny_tokenizer, out, max_length=40)  # recomputing replaces the columns
    assert again["ref_chosen_logp"] == pytest.approx(out["ref_chosen_logp"], rel=1e-9)


def _margin(model, tokenizer, pairs, max_length=64) -> float:
    """Mean s(chosen) − s(rejected) over the pairs, from full logits."""
    values = [_independent_logp(model, tokenizer, r["prompt"], r["chosen"], max_length)
              - _independent_logp(model, tokenizer, r["prompt"], r["rejected"], max_length) for r in pairs]
    return sum(values) / len(values)


def _pair_rows():
    return [{"prompt": f"{a}+3?", "chosen": f"\\boxed{{{a + 3}}}", "rejected": f"it is {a + 4}"} for a in range(2, 10)]


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_pairwise_training_widens_the_margin(objective, tiny_tokenizer, tmp_path):
    pairs = datasets.Dataset.from_list(_pair_rows())
    model = make_tiny_model(tiny_tokenizer, seed=1)
    before = _margin(model, tiny_tokenizer, pairs)
    if objective == "dpo":  # the cached reference columns travel with the data
        pairs = add_reference_logps(model, tiny_tokenizer, pairs, max_length=64)
    config = TrainConfig(objective=ObjectiveConfig(name=objective), lr=3e-3, batch_size=4, micro_batch_size=2,
                         epochs=4.0, max_length=64, warmup_ratio=0.0, trackers=["jsonl"], progress=False,
                         mixed_precision="no")
    train(model, tiny_tokenizer, pairs, config, out_dir=tmp_path / objective)
    after = _margin(model, tiny_tokenizer, pairs)
    assert after > before + 1.0, (before, after)


def test_cli_trains_dpo_on_a_preference_file_with_the_reference_cached(tiny_dir, tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pair_rows()))
    train = TrainConfig(lr=3e-3, batch_size=4, micro_batch_size=2, epochs=4.0, max_length=64, warmup_ratio=0.0,
                        trackers=["jsonl"], progress=False, mixed_precision="no")
    config = save_config(LoopConfig(model=ModelConfig(name=str(tiny_dir)), train=train), tmp_path / "c.yaml")
    out = tmp_path / "dpo"
    assert cli.main(["train", "--config", str(config), "--objective", "dpo", "--data", str(data), "--out", str(out)]) == 0

    base, tokenizer = load_model(str(tiny_dir))
    cached = datasets.load_from_disk(str(out / "reference_logps" / "pairs"))
    for row in cached:  # the reference is the starting model
        assert row["ref_chosen_logp"] == pytest.approx(_independent_logp(base, tokenizer, row["prompt"], row["chosen"], 64),
                                                       abs=1e-4)
        assert row["ref_rejected_logp"] == pytest.approx(
            _independent_logp(base, tokenizer, row["prompt"], row["rejected"], 64), abs=1e-4)
    tuned, _ = load_model(str(out))
    pairs = read_preferences(data)[0]
    assert _margin(tuned, tokenizer, pairs) > _margin(base, tokenizer, pairs) + 1.0

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran again")

    monkeypatch.setattr(preference_pairs, "add_reference_logps", no_reference)
    again = preference_pairs.cached_reference_logps(base, tokenizer, pairs, out / "reference_logps", max_length=64)
    assert again["ref_chosen_logp"] == cached["ref_chosen_logp"]
    with pytest.raises(AssertionError, match="ran again"):  # other settings, other token ids: not the cache
        preference_pairs.cached_reference_logps(base, tokenizer, pairs, out / "reference_logps", max_length=32)


def test_cli_pairwise_objective_needs_preference_data(tiny_dir, tmp_path, capsys):
    config = save_config(LoopConfig(model=ModelConfig(name=str(tiny_dir))), tmp_path / "c.yaml")
    assert cli.main(["train", "--config", str(config), "--objective", "simpo", "--out", str(tmp_path / "x")]) == 2
    assert "preference pairs" in capsys.readouterr().err
    demonstrations = tmp_path / "demos.jsonl"
    demonstrations.write_text(json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    assert cli.main(["train", "--config", str(config), "--objective", "dpo", "--data", str(demonstrations),
                     "--out", str(tmp_path / "y")]) == 1
    assert "line 1: field 'chosen'" in capsys.readouterr().err


class CappedBackend(ScriptedBackend):
    """A scripted backend that, like a real one, cuts a sample at max_new_tokens, where it has no eos."""

    def sample(self, prompt_ids, config, seeds=None):
        return [[s[: config.max_new_tokens] for s in row] for row in super().sample(prompt_ids, config, seeds)]


def test_samples_cut_at_the_token_limit_get_no_end_of_turn(tiny_tokenizer, tiny_model):
    prompts = datasets.Dataset.from_list([
        {"id": "a", "prompt": "2+3?", "response": "2+3=5 \\boxed{5}", "answer": "5", "system": ""},
        {"id": "b", "prompt": "4+4?", "response": "4+4=8 \\boxed{8}", "answer": "8", "system": ""},
    ])
    backend = CappedBackend(tiny_tokenizer, [["it is \\boxed{6} I think", "\\boxed{5}"], ["no answer at all, sorry", "no"]])
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12)
    pairs, _ = build_pairs(tiny_model, tiny_tokenizer, prompts, k=2, backend=backend, sampling=sampling)
    rows = pairs.to_list()
    assert [(r["chosen"], r["chosen_truncated"]) for r in rows] == [("\\boxed{5}", False), ("4+4=8 \\boxed{8}", False)]
    assert [(r["rejected"], r["rejected_truncated"]) for r in rows] == [("it is \\boxed", True), ("no answer at", True)]

    eos = tiny_tokenizer.eos_token_id
    encoded = tokenize_for_training(pairs, tiny_tokenizer, max_length=64, pairwise=True)[0]
    assert all(ids[-1] == eos for ids in encoded["chosen_input_ids"])
    assert [ids[-1] != eos for ids in encoded["rejected_input_ids"]] == [True, True]
    scored = ddt.score(tiny_model, tiny_tokenizer, pairs.select_columns(["prompt", "system", "rejected", "rejected_truncated"]),
                       progress=False, response_column="rejected")
    assert list(scored["ddt_n_tokens"]) == [12, 12]  # the sampled tokens alone
