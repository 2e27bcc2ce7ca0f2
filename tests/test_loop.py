"""The loop and its baseline arm end to end on a tiny model (2 rounds), resume after a failure at each
stage, refusal of a resume with other inputs, the run lock, configs and CLI."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from decoding.sampling import HintedDecodingConfig, SamplingConfig
from onpolicy_sft.arith import arithmetic_splits
from onpolicy_sft.cli import main
from onpolicy_sft.config import (DataConfig, EvalConfig, LoopConfig, ModelConfig, ObjectiveConfig, OnlineConfig,
                                 TrainConfig, load_config)
from onpolicy_sft.config_io import apply_overrides, save_config
from onpolicy_sft.loop import run_loop
from onpolicy_sft.rewrite_config import RewriteConfig
from onpolicy_sft.rundir import DirectoryLocked, InputsChanged
from tiny import SHORT_EXEMPLAR

pytestmark = pytest.mark.usefixtures("one_thread")


def _loop_config(tiny_dir, out_dir) -> LoopConfig:
    return LoopConfig(
        out_dir=str(out_dir), rounds=2, backend="hf",
        model=ModelConfig(name=str(tiny_dir)),
        # No worked examples: with the arithmetic default pair a prompt alone fills the tiny max_length.
        data=DataConfig(n_train=8, n_test=4, n_test_hard=4, n_general=3, exemplars=SHORT_EXEMPLAR),
        rewrite=RewriteConfig(k_self=1, m_hinted=1, sampling=SamplingConfig(max_new_tokens=8),
                              hinted=HintedDecodingConfig(max_new_tokens=8), shard_size=4, progress=False),
        train=TrainConfig(objective=ObjectiveConfig(name="sft"), lr=5e-3, batch_size=4, micro_batch_size=2,
                          trackers=["jsonl"], progress=False, max_length=512),
        eval=EvalConfig(max_new_tokens=8, forgetting_max_new_tokens=6),
    )


def _final_weights(out_dir):
    return load_file(Path(out_dir) / "round_2" / "onpolicy" / "checkpoint" / "model.safetensors")


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loop")
    return out, run_loop(_loop_config(tiny_dir, out))


def _rows(summary) -> dict:
    return {(row["round"], row["arm"]): row for row in summary["rounds"]}


def test_loop_runs_every_stage_of_both_arms_once_and_keeps_each_checkpoint(finished):
    out, _ = finished
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {"base/general", "round_0/eval"}
    expected |= {f"round_{r}/onpolicy/{s}" for r in (1, 2) for s in ("rewrite", "ddt", "train", "eval")}
    expected |= {f"round_{r}/baseline/{s}" for r in (1, 2) for s in ("ddt", "train", "eval")}
    assert set(manifest["stages"]) == expected and manifest["unfinished"] == {}
    assert all(entry["attempts"] == 1 for entry in manifest["stages"].values())
    for r in (1, 2):
        for sub in ("corpus", "ddt", "checkpoint", "eval"):
            assert (out / f"round_{r}" / "onpolicy" / sub).is_dir()
        for arm in ("onpolicy", "baseline"):
            assert (out / f"round_{r}" / arm / "checkpoint" / "model.safetensors").exists()
    assert manifest["stages"]["round_1/baseline/train"]["objective"] == "sft"
    assert manifest["stages"]["round_1/onpolicy/train"]["objective"] == "sft"  # the test config trains both with sft


def test_summary_has_the_base_then_both_arms_per_round_and_only_trained_models_moved(finished):
    _, summary = finished
    rows = _rows(summary)
    assert list(rows) == [(0, "base"), (1, "onpolicy"), (1, "baseline"), (2, "onpolicy"), (2, "baseline")]
    assert rows[0, "base"]["forgetting_kl"] == pytest.approx(0.0, abs=1e-6)  # the base model against itself
    for key, row in rows.items():
        if key[0] > 0:
            assert row["forgetting_kl"] > 0  # training moved the model away from the base
            assert {"acc_test", "acc_test_hard", "phi_mean", "seconds_train", "seconds_eval"} <= set(row)


def test_summary_phi_is_the_mean_over_the_scored_corpus_overall_and_per_source(finished):
    out, summary = finished
    scored = datasets.load_from_disk(str(out / "round_1" / "onpolicy" / "ddt" / "dataset"))
    r1 = _rows(summary)[1, "onpolicy"]
    assert r1["phi_mean"] == pytest.approx(sum(scored["ddt_phi_mean"]) / len(scored))
    assert sum(r1["sources"].values()) == 8
    for source in ("self", "hinted", "original"):
        values = [abs(p) for p, s in zip(scored["ddt_phi_mean"], scored["source"]) if s == source]
        assert r1[f"abs_phi_{source}"] == (pytest.approx(sum(values) / len(values)) if values else None)


def test_the_runs_exemplar_turns_reach_the_trained_corpus(finished):
    out, _ = finished
    scored = datasets.load_from_disk(str(out / "round_1" / "onpolicy" / "ddt" / "dataset"))
    assert scored["exemplars"] == [SHORT_EXEMPLAR] * len(scored)


def test_the_baseline_trains_on_the_original_demonstrations_only(finished):
    out, summary = finished
    assert _rows(summary)[1, "baseline"]["sources"] == {"self": 0, "hinted": 0, "original": 8}
    baseline_scored = datasets.load_from_disk(str(out / "round_1" / "baseline" / "ddt" / "dataset"))
    assert baseline_scored["response"] == arithmetic_splits(n_train=8, n_test=4, n_test_hard=4)["train"]["response"]


def test_both_arms_start_from_the_base_then_each_from_its_own_checkpoint(finished, tiny_dir):
    out, summary = finished
    rows = _rows(summary)
    assert rows[1, "onpolicy"]["train_from"] == rows[1, "baseline"]["train_from"] == str(tiny_dir)
    for arm in ("onpolicy", "baseline"):
        assert rows[2, arm]["train_from"] == str(out / "round_1" / arm / "checkpoint")
    # round 2 trains from round 1's checkpoint: its weights differ from round 1's
    w1 = load_file(out / "round_1" / "onpolicy" / "checkpoint" / "model.safetensors")
    assert any(not torch.equal(w1[k], v) for k, v in _final_weights(out).items())


def test_loop_writes_the_summary_table_plots_and_config(finished):
    out, _ = finished
    for name in ("summary.png", "phi_hist.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith("| round | arm | corpus self/hinted/original | φ corpus |")
    assert "| acc test | acc test_hard | forgetting KL | rewrite s | ddt s | train s | eval s |" in table[0]
    assert len(table) == 2 + 5
    assert table[4].startswith("| 1 | baseline (sft, original) | 0/0/8 |")
    assert (out / "config.yaml").exists()


def test_loop_with_triage_and_several_verified_answers_keeps_the_arms_budget_in_rows(tiny_dir, tmp_path, monkeypatch):
    import dataclasses

    import onpolicy_sft.rewrite as rw
    from onpolicy_sft.rewrite_config import TriageConfig
    from onpolicy_sft.rewrite_record import SOURCES
    from test_rewrite import _accept_some

    monkeypatch.setattr(rw, "is_correct", _accept_some)  # a stand-in verdict, so that answers verify
    config = _loop_config(tiny_dir, tmp_path / "run")
    config.rounds, config.eval_base = 1, False
    config.rewrite = dataclasses.replace(config.rewrite, k_self=6, keep_verified=2, adaptive=True,
                                         triage=TriageConfig(by="phi", level=0.2))
    config.train = dataclasses.replace(config.train, rows=8)
    summary = run_loop(config)
    corpus = datasets.load_from_disk(str(tmp_path / "run" / "round_1" / "onpolicy" / "corpus" / "dataset"))
    onpolicy = next(row for row in summary["rounds"] if row["arm"] == "onpolicy")
    assert onpolicy["sources"] == {s: corpus["source"].count(s) for s in SOURCES}
    assert len(corpus) > 8 and len({i.split("#")[0] for i in corpus["id"]}) == 8  # some question gave 2 rows
    assert summary["table"].splitlines()[0].startswith("| round | arm | corpus self/hinted/original/in_distribution |")
    for arm in ("onpolicy", "baseline"):  # 8 rows in steps of 4, whatever the corpus size
        record = json.loads((tmp_path / "run" / "round_1" / arm / "checkpoint" / "train_data.json").read_text())
        assert record["steps"] == 2


class _Killed(Exception):
    pass


STAGE_FUNCTIONS = {
    "rewrite": ("onpolicy_sft.loop", "rewrite_corpus"),
    "ddt": ("onpolicy_sft.ddt_report", "write_report"),
    "train": ("onpolicy_sft.loop", "train"),
    "eval": ("onpolicy_sft.evaluate", "forgetting"),
}


@pytest.mark.parametrize("stage", list(STAGE_FUNCTIONS))
def test_resume_after_failure_at_each_stage(stage, tiny_dir, tmp_path, monkeypatch, finished):
    """Die inside round 1's stage; the rerun skips what finished and ends where an unbroken run ends.

    One round keeps this cheap: a one-round run with the same seeds is the first round of the
    two-round reference run, so its checkpoint must equal the reference's round-1 checkpoint.
    """
    module = importlib.import_module(STAGE_FUNCTIONS[stage][0])
    real = getattr(module, STAGE_FUNCTIONS[stage][1])
    calls = {"n": 0}
    die_at = 2 if stage == "eval" else 1  # eval's function runs for round 0 first

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise _Killed(stage)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, STAGE_FUNCTIONS[stage][1], flaky)
    config = _loop_config(tiny_dir, tmp_path)
    config.rounds = 1
    config.baseline.enabled = False  # the arms are independent: the on-policy arm alone must match
    with pytest.raises(_Killed):
        run_loop(config)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert f"round_1/onpolicy/{stage}" not in manifest["stages"] and "round_0/eval" in manifest["stages"]
    assert manifest["unfinished"][f"round_1/onpolicy/{stage}"]["attempts"] == 1
    before = calls["n"]
    summary = run_loop(config)
    assert calls["n"] == before + 1  # only the unfinished stage ran its function again
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["stages"][f"round_1/onpolicy/{stage}"]
    assert entry["attempts"] == 2 and entry["seconds"] >= entry["last_attempt_seconds"]
    assert "(2 tries)" in summary["table"]
    reference_out, reference = finished
    mine = load_file(tmp_path / "round_1" / "onpolicy" / "checkpoint" / "model.safetensors")
    for key, value in load_file(reference_out / "round_1" / "onpolicy" / "checkpoint" / "model.safetensors").items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6)
    theirs_rows = [row for row in reference["rounds"] if row["arm"] in ("base", "onpolicy")][:2]
    for row, theirs in zip(summary["rounds"], theirs_rows):
        for key in ("acc_test", "acc_test_hard", "forgetting_kl", "phi_mean", "phi_original"):
            if key in theirs:
                assert row[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


def test_resume_with_another_config_is_refused_and_keeps_the_record(finished, tiny_dir):
    out, _ = finished
    config_before = (out / "config.yaml").read_text()
    manifest_before = (out / "manifest.json").read_text()
    config = _loop_config(tiny_dir, out)
    config.train.lr = 1e-4
    config.data.n_train = 6
    with pytest.raises(InputsChanged, match=r"train\.lr: was 0\.005, now 0\.0001") as err:
        run_loop(config)
    assert "data.n_train" in str(err.value)
    assert (out / "config.yaml").read_text() == config_before
    assert (out / "manifest.json").read_text() == manifest_before


def test_a_second_loop_on_the_same_directory_is_refused(tiny_dir, tmp_path, lock_holder):
    holder = lock_holder(tmp_path, "loop")
    with pytest.raises(DirectoryLocked, match=rf"in use by another stage \(loop, pid {holder.pid}\)"):
        run_loop(_loop_config(tiny_dir, tmp_path))
    assert not (tmp_path / "manifest.json").exists()


def test_overrides_parse_as_yaml_survive_a_save_and_bad_ones_are_refused(tmp_path):
    config = apply_overrides(LoopConfig(), ["train.lr=1e-5", "train.objective.name=target_sft",
                                            "train.objective.hparams={eta: 0.3}", "rounds=3", "eval.pass_k=[1,4]"])
    path = save_config(config, tmp_path / "c.yaml")
    again = load_config(path)
    assert again == config
    assert again.train.lr == 1e-5 and again.train.objective.hparams == {"eta": 0.3} and again.eval.pass_k == [1, 4]
    with pytest.raises(ValueError, match="valid keys"):
        apply_overrides(config, ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(config, ["rounds=two"])
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides(config, ["rounds"])


def test_cli_loop_on_a_finished_run_reruns_nothing_and_prints_the_table(finished, tiny_dir, tmp_path, capsys):
    """The CLI's loop from a config file is the Python loop: it finds the shared run finished under
    the same inputs (other inputs would be refused), runs no stage again, and prints the table."""
    out, summary = finished
    stages_before = json.loads((out / "manifest.json").read_text())["stages"]
    config_file = save_config(_loop_config(tiny_dir, out), tmp_path / "loop.yaml")
    assert main(["loop", "--config", str(config_file)]) == 0
    printed = capsys.readouterr().out
    assert "| round | arm |" in printed and "| 1 | on-policy (sft, rewritten) |" in printed
    assert "| 2 | baseline (sft, original) |" in printed
    assert json.loads((out / "manifest.json").read_text())["stages"] == stages_before
    again = json.loads((out / "summary.json").read_text())["rounds"]
    assert [(r["round"], r["arm"], r["acc_test"]) for r in again] == [
        (r["round"], r["arm"], r["acc_test"]) for r in summary["rounds"]]
    assert (out / "run.log").exists()


def test_cli_train_writes_a_finished_checkpoint_that_cli_eval_scores(tiny_dir, tmp_path, capsys):
    config_file = save_config(_loop_config(tiny_dir, tmp_path / "unused"), tmp_path / "c.yaml")
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--config", str(config_file), "--out", str(ckpt), "--set", "data.n_train=4"]) == 0
    assert (ckpt / "model.safetensors").exists() and (ckpt / "training_complete.json").exists()
    assert main(["eval", "--config", str(config_file), "--model", str(ckpt), "--base", str(tiny_dir),
                 "--out", str(tmp_path / "eval"), "--set", "data.n_test=2", "--set", "data.n_test_hard=2"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["test"]["n_examples"] == 2 and metrics["forgetting"]["kl"] > 0
    assert len((tmp_path / "eval" / "test_hard" / "results.jsonl").read_text().splitlines()) == 2


# ---------------------------------------------------------------------------------------------
# Online mode: the rewrite inside training, block by block


def _online_config(tiny_dir, out_dir, steps: int, rows: int) -> LoopConfig:
    config = _loop_config(tiny_dir, out_dir)
    config.rounds, config.eval_base, config.baseline.enabled = 1, False, False
    config.online = OnlineConfig(steps_per_rewrite=steps, rows_per_rewrite=rows)
    return config


def test_online_options_are_checked_before_any_model_loads():
    with pytest.raises(ValueError, match="online.steps_per_rewrite: set both steps_per_rewrite and rows_per_rewrite"):
        apply_overrides(LoopConfig(), ["online.steps_per_rewrite=2"])
    with pytest.raises(ValueError, match=r"online.steps_per_rewrite: must be >= 0"):
        apply_overrides(LoopConfig(), ["online.steps_per_rewrite=-1", "online.rows_per_rewrite=4"])
    with pytest.raises(ValueError, match="online: online mode rewrites with the model in training"):
        apply_overrides(LoopConfig(), ["online.steps_per_rewrite=1", "online.rows_per_rewrite=4", "train.fsdp=true"])
    assert not LoopConfig().online.enabled


def test_online_with_one_block_per_round_from_the_cli_is_the_offline_loop(finished, tiny_dir, tmp_path):
    """rows_per_rewrite the whole corpus and steps_per_rewrite a whole round (8 rows in steps of 4: 2
    steps): the round's one block is the offline round, so the weights equal the offline loop's."""
    config_file = save_config(_loop_config(tiny_dir, tmp_path / "run"), tmp_path / "loop.yaml")
    assert main(["loop", "--config", str(config_file), "--set", "rounds=1", "--set", "eval_base=false",
                 "--set", "baseline.enabled=false", "--set", "online.steps_per_rewrite=2",
                 "--set", "online.rows_per_rewrite=100"]) == 0
    reference_out, reference = finished
    mine = load_file(tmp_path / "run" / "round_1" / "onpolicy" / "checkpoint" / "model.safetensors")
    for key, value in load_file(reference_out / "round_1" / "onpolicy" / "checkpoint" / "model.safetensors").items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    theirs = next(row for row in reference["rounds"] if (row["round"], row["arm"]) == (1, "onpolicy"))
    row = summary["rounds"][0]
    assert row["sources"] == theirs["sources"]
    for key in ("phi_mean", "phi_original", "acc_test", "forgetting_kl"):
        assert row[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["round_1/onpolicy/rewrite"]["stats"]["online"]["blocks"] == 1


def _online_resumable(tiny_dir, out_dir) -> LoopConfig:
    # 16 rows in steps of 4: 4 steps, one block of 4 rows each; the blocks wrap round the 8 rows.
    config = _online_config(tiny_dir, out_dir, steps=1, rows=4)
    config.train.rows, config.train.save_every = 16, 1
    return config


@pytest.fixture(scope="module")
def online_unbroken(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("online")
    return out, run_loop(_online_resumable(tiny_dir, out))


def test_online_rewrites_every_block_with_the_weights_about_to_train_on_it(online_unbroken):
    out, summary = online_unbroken
    blocks = out / "round_1" / "onpolicy" / "corpus" / "blocks"
    rows = [datasets.load_from_disk(str(blocks / f"block_{b:04d}" / "dataset")) for b in range(4)]
    assert [r["id"] for r in rows[:2]] == [r["id"] for r in rows[2:]] and rows[0]["id"] != rows[1]["id"]
    # blocks 0 and 2 hold the same originals, scored by the weights of step 0 and of step 2
    for first, again in zip(rows[0]["ddt_original_phi_mean"], rows[2]["ddt_original_phi_mean"]):
        assert first != pytest.approx(again, rel=1e-6, abs=0)
    corpus = datasets.load_from_disk(str(out / "round_1" / "onpolicy" / "corpus" / "dataset"))
    assert len(corpus) == 16 and sum(summary["rounds"][0]["sources"].values()) == 16
    record = json.loads((out / "round_1" / "onpolicy" / "checkpoint" / "training_complete.json").read_text())
    assert record["steps"] == 4
    online = summary["rounds"][0]["online"]  # the overhead per block: the weight sync and the rewrite
    assert online["blocks"] == 4 and online["rows_per_block"] == [4] * 4
    assert online["mean_seconds_rewrite"] > 0 and online["mean_seconds_sync"] >= 0


@pytest.mark.parametrize("kill", ["rewrite", "save_state"])
def test_online_resumes_after_a_kill_to_the_same_weights(kill, online_unbroken, tiny_dir, tmp_path, monkeypatch):
    """Killed in block 2's rewrite, or at step 3 (block 2 rewritten and saved, the resume state at
    step 2): the rerun resumes at step 2 and ends with the unbroken run's weights."""
    import onpolicy_sft.loop as loop
    import onpolicy_sft.train as training

    module = loop if kill == "rewrite" else training
    name = "rewrite_corpus" if kill == "rewrite" else "save_state"
    real, rewrites, calls = getattr(module, name), loop.rewrite_corpus, {"n": 0, "rewrites": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed(kill)
        return real(*args, **kwargs)

    def counted(*args, **kwargs):
        calls["rewrites"] += 1
        return (flaky if kill == "rewrite" else rewrites)(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    monkeypatch.setattr(loop, "rewrite_corpus", counted)
    with pytest.raises(_Killed):
        run_loop(_online_resumable(tiny_dir, tmp_path))
    before = calls["rewrites"]
    summary = run_loop(_online_resumable(tiny_dir, tmp_path))
    # resumed at step 2: block 2 rewritten again only when the kill came before it was saved
    assert calls["rewrites"] - before == (2 if kill == "rewrite" else 1)
    reference_out, reference = online_unbroken
    mine = load_file(tmp_path / "round_1" / "onpolicy" / "checkpoint" / "model.safetensors")
    for key, value in load_file(reference_out / "round_1" / "onpolicy" / "checkpoint" / "model.safetensors").items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6)
    for key in ("phi_mean", "acc_test", "forgetting_kl"):
        assert summary["rounds"][0][key] == pytest.approx(reference["rounds"][0][key], rel=1e-4, abs=1e-6), key
