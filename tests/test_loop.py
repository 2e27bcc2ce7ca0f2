"""The loop end to end on a tiny model (2 rounds), resume after a failure at each stage, configs and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from onpolicy_sft.config import (DataConfig, EvalConfig, LoopConfig, ModelConfig, ObjectiveConfig, TrainConfig,
                                 apply_overrides, load_config, save_config)

REPO = Path(__file__).parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _loop_config(tiny_dir, out_dir) -> LoopConfig:
    return LoopConfig(
        out_dir=str(out_dir), rounds=2, backend="hf",
        model=ModelConfig(name=str(tiny_dir)),
        data=DataConfig(n_train=8, n_test=4, n_test_hard=4, n_general=3),
        rewrite={"k_self": 1, "m_hinted": 1, "sampling": {"max_new_tokens": 8}, "hinted": {"max_new_tokens": 8},
                 "shard_size": 4, "progress": False},
        train=TrainConfig(objective=ObjectiveConfig(name="sft"), lr=5e-3, batch_size=4, micro_batch_size=2,
                          trackers=["jsonl"], progress=False, max_length=512),
        eval=EvalConfig(max_new_tokens=8, forgetting_max_new_tokens=6),
    )


def _final_weights(out_dir):
    from safetensors.torch import load_file

    return load_file(Path(out_dir) / "round_2" / "checkpoint" / "model.safetensors")


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    from onpolicy_sft.loop import run_loop

    out = tmp_path_factory.mktemp("loop")
    return out, run_loop(_loop_config(tiny_dir, out))


def test_loop_two_rounds_end_to_end(finished):
    out, summary = finished
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {"base/general", "round_0/eval"} | {f"round_{r}/{s}" for r in (1, 2) for s in ("rewrite", "ddt", "train", "eval")}
    assert set(manifest["stages"]) == expected
    for r in (1, 2):
        for sub in ("corpus", "ddt", "checkpoint", "eval"):
            assert (out / f"round_{r}" / sub).is_dir()
        assert (out / f"round_{r}" / "checkpoint" / "model.safetensors").exists()
    assert [row["round"] for row in summary["rounds"]] == [0, 1, 2]
    base_row, r1 = summary["rounds"][0], summary["rounds"][1]
    assert base_row["forgetting_kl"] == pytest.approx(0.0, abs=1e-6)  # the base model against itself
    assert r1["forgetting_kl"] > 0  # training moved the model away from the base
    assert {"acc_test", "acc_test_hard", "phi_rewritten", "phi_original", "seconds_train"} <= set(r1)
    # the mean φ of the table is the mean of the scored corpus's per-response means
    scored = datasets.load_from_disk(str(out / "round_1" / "ddt" / "dataset"))
    assert r1["phi_rewritten"] == pytest.approx(sum(scored["ddt_phi_mean"]) / len(scored))
    assert (out / "summary.png").stat().st_size > 0
    assert (out / "summary.md").read_text().startswith("| round |")
    assert (out / "config.yaml").exists()
    # round 2 trains from round 1's checkpoint: its weights differ from round 1's
    from safetensors.torch import load_file

    w1 = load_file(out / "round_1" / "checkpoint" / "model.safetensors")
    assert any(not torch.equal(w1[k], v) for k, v in _final_weights(out).items())


class _Killed(Exception):
    pass


STAGE_FUNCTIONS = {
    "rewrite": ("decoding.rewrite", "rewrite_corpus"),
    "ddt": ("onpolicy_sft.ddt_report", "write_report"),
    "train": ("onpolicy_sft.train", "train"),
    "eval": ("onpolicy_sft.evaluate", "forgetting"),
}


@pytest.mark.parametrize("stage", list(STAGE_FUNCTIONS))
def test_resume_after_failure_at_each_stage(stage, tiny_dir, tmp_path, monkeypatch, finished):
    """Die inside round 1's stage; the rerun skips what finished and ends where an unbroken run ends.

    One round keeps this cheap: a one-round run with the same seeds is the first round of the
    two-round reference run, so its checkpoint must equal the reference's round-1 checkpoint.
    """
    import importlib

    from safetensors.torch import load_file

    from onpolicy_sft.loop import run_loop

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
    with pytest.raises(_Killed):
        run_loop(config)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert f"round_1/{stage}" not in manifest["stages"] and "round_0/eval" in manifest["stages"]
    before = calls["n"]
    summary = run_loop(config)
    assert calls["n"] == before + 1  # only the unfinished stage ran its function again
    reference_out, reference = finished
    mine = load_file(tmp_path / "round_1" / "checkpoint" / "model.safetensors")
    for key, value in load_file(reference_out / "round_1" / "checkpoint" / "model.safetensors").items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6)
    for row, theirs in zip(summary["rounds"], reference["rounds"][:2]):
        for key in ("acc_test", "acc_test_hard", "forgetting_kl", "phi_rewritten", "phi_original"):
            if key in theirs:
                assert row[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


def test_config_yaml_round_trip_and_overrides(tmp_path):
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


LOOP_CONFIGS = ["cpu_default.yaml", "gpu_qwen25math15b_idft.yaml", "gpu_qwen25math15b_target_sft.yaml"]


@pytest.mark.parametrize("name", LOOP_CONFIGS)
def test_example_configs_load(name):
    config = load_config(REPO / "experiments" / "configs" / name)
    assert config.rounds >= 1 and config.train.lr > 0


def test_cli_loop_prints_the_table(tiny_dir, tmp_path, capsys):
    from onpolicy_sft.cli import main

    config_file = save_config(_loop_config(tiny_dir, tmp_path / "run"), tmp_path / "loop.yaml")
    assert main(["loop", "--config", str(config_file), "--set", "rounds=1", "--set", "eval_base=false"]) == 0
    printed = capsys.readouterr().out
    assert "| round |" in printed and "| 1 |" in printed
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"][0]["round"] == 1


def test_cli_train_then_eval(tiny_dir, tmp_path, capsys):
    from onpolicy_sft.cli import main

    config_file = save_config(_loop_config(tiny_dir, tmp_path / "unused"), tmp_path / "c.yaml")
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--config", str(config_file), "--out", str(ckpt), "--set", "data.n_train=4"]) == 0
    assert (ckpt / "model.safetensors").exists() and (ckpt / "training_complete.json").exists()
    assert main(["eval", "--config", str(config_file), "--model", str(ckpt), "--base", str(tiny_dir),
                 "--out", str(tmp_path / "eval"), "--set", "data.n_test=2", "--set", "data.n_test_hard=2"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["test"]["n_examples"] == 2 and metrics["forgetting"]["kl"] > 0
    assert len((tmp_path / "eval" / "test_hard" / "results.jsonl").read_text().splitlines()) == 2
