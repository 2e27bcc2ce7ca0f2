"""The comparison runner end to end on a tiny model (one seed), its resumption per cell, its refusal of
changed inputs, configs and CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from onpolicy_sft import cli, compare
from onpolicy_sft.compare import _answered, run_comparison, score_columns
from onpolicy_sft.compare_config import METHODS, CompareConfig, PairsConfig
from onpolicy_sft.grading import extract_answer
from onpolicy_sft.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, load_config
from onpolicy_sft.rundir import InputsChanged
from tiny import SHORT_EXEMPLAR

REPO = Path(__file__).parent.parent


def _config(tiny_dir, out_dir) -> CompareConfig:
    return CompareConfig(
        out_dir=str(out_dir), seeds=[0], backend="hf",
        model=ModelConfig(name=str(tiny_dir)),
        data=DataConfig(n_train=4, n_test=2, n_test_hard=2, n_general=2, exemplars=SHORT_EXEMPLAR),
        rewrite={"k_self": 1, "m_hinted": 1, "sampling": {"max_new_tokens": 4}, "hinted": {"max_new_tokens": 4},
                 "progress": False},
        pairs=PairsConfig(k=2, max_new_tokens=4),
        train=TrainConfig(lr=1e-3, batch_size=2, micro_batch_size=2, max_length=256, trackers=["jsonl"],
                          progress=False, mixed_precision="no"),
        eval=EvalConfig(max_new_tokens=4, n_samples=2, pass_k=[1, 2], forgetting_max_new_tokens=4),
    )


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return out, run_comparison(_config(tiny_dir, out))


def _by_method(summary) -> dict:
    return {row["method"]: row for row in summary["rows"]}


def test_comparison_has_one_row_per_method_and_only_trained_methods_moved(finished):
    _, summary = finished
    rows = _by_method(summary)
    assert list(rows) == list(METHODS)
    for method, row in rows.items():
        for split in ("test", "test_hard"):
            assert 0.0 <= row[f"acc_{split}"] <= 1.0 and row[f"acc_{split}_se"] >= 0.0
        if method == "base":
            assert row["seeds"] == 0 and row["forgetting_kl"] == pytest.approx(0.0, abs=1e-6)
            continue
        assert row["seeds"] == 1 and row["corpus"] == METHODS[method][1]
        assert row["forgetting_kl"] > 0.0  # every method moved the weights
        assert math.isfinite(row["phi_corpus"]) and row["train_seconds"] > 0.0


def test_each_cells_scores_are_those_of_its_answer_files_and_its_weights_are_not_kept(finished):
    out, summary = finished
    for method, row in _by_method(summary).items():
        if method == "base":
            continue
        cell = out / "cells" / method / "seed_0"
        result = json.loads((cell / "result.json").read_text())
        assert result["train_rows"] >= 1 and not list((cell / "checkpoint").glob("*.safetensors"))
        for split in ("test", "test_hard"):
            records = [json.loads(line) for line in (cell / "eval" / split / "results.jsonl").read_text().splitlines()]
            assert len(records) == 2
            assert result["metrics"][split]["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 2)
            assert row[f"avg_{split}"] == pytest.approx(sum(r["samples_correct"] / r["n_samples"] for r in records) / 2)
            assert row[f"pass2_{split}"] == pytest.approx(sum(r["samples_correct"] > 0 for r in records) / 2)
        stated = [extract_answer(json.loads(line)["response"]) is not None for split in ("test", "test_hard")
                  for line in (cell / "eval" / split / "results.jsonl").read_text().splitlines()]
        assert row["answered"] == pytest.approx(sum(stated) / 4)
        assert row["answer_tokens"] == pytest.approx(
            sum(result["metrics"][s]["mean_response_tokens"] for s in ("test", "test_hard")) / 2)


def test_preference_methods_train_on_pairs_from_the_same_prompts_and_are_charged_their_sampling(finished):
    out, summary = finished
    rows = _by_method(summary)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["stages"]["corpus/pairs"]["counts"]
    assert counts["prompts"] == 4 and counts["kept"] + counts["dropped"] == 4
    dpo_cell = json.loads((out / "cells" / "dpo" / "seed_0" / "result.json").read_text())
    assert dpo_cell["train_rows"] == counts["kept"]
    pairs_stage = manifest["stages"]["corpus/pairs"]
    assert rows["dpo"]["corpus_seconds"] == pytest.approx(pairs_stage["sample_seconds"] + pairs_stage["ref_logps_seconds"])
    assert rows["simpo"]["corpus_seconds"] == pytest.approx(pairs_stage["sample_seconds"])
    assert rows["sft"]["corpus_seconds"] == 0.0


def test_comparison_writes_the_results_table_and_plot(finished):
    out, _ = finished
    for name in ("results.json", "results.md", "compare.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)
    assert "| avg@2 test | avg@2 test_hard | pass@2 test | pass@2 test_hard |" in table


def test_comparison_resumes_per_cell(finished, tiny_dir, monkeypatch):
    import onpolicy_sft.train as training

    out, summary = finished
    calls = []
    real_loop = training.train_loop

    def counting_loop(*args, **kwargs):  # runs only when a cell trains, not when its finished weights load
        calls.append(kwargs["out_dir"])
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(training, "train_loop", counting_loop)
    again = run_comparison(_config(tiny_dir, out))
    assert calls == [] and again["rows"] == summary["rows"]  # nothing rerun, the same table

    (out / "cells" / "simpo" / "seed_0" / "result.json").unlink()
    kept = (out / "cells" / "sft" / "seed_0" / "result.json").read_text()
    third = run_comparison(_config(tiny_dir, out))
    assert [Path(c).parent.parent.name for c in calls] == ["simpo"]
    assert (out / "cells" / "sft" / "seed_0" / "result.json").read_text() == kept
    assert [r["method"] for r in third["rows"]] == list(METHODS)


def test_rerun_with_other_inputs_is_refused_naming_them(finished, tiny_dir, monkeypatch):
    out, _ = finished
    kept = {name: (out / name).read_text() for name in ("config.yaml", "manifest.json", "results.json")}
    config = _config(tiny_dir, out)
    config.train.lr = 1e-4
    config.data.n_train = 3
    with pytest.raises(InputsChanged, match=r"train\.lr: was 0\.001, now 0\.0001") as err:
        run_comparison(config)
    assert "data.n_train: was 4, now 3" in str(err.value)
    assert {name: (out / name).read_text() for name in kept} == kept  # refused before writing anything

    monkeypatch.setattr(compare, "train", lambda *a, **k: pytest.fail("a finished cell was trained again"))
    more = _config(tiny_dir, out)
    more.train.progress = True  # display only: the same inputs, so the run resumes
    assert run_comparison(more)["table"] == json.loads(kept["results.json"])["table"]


@pytest.mark.parametrize("name", ["compare_cpu", "compare_gpu_qwen25math15b"])
def test_configs_load_and_cover_every_method_with_three_seeds(name):
    config = load_config(REPO / "experiments" / "configs" / f"{name}.yaml", cls=CompareConfig)
    assert config.methods == list(METHODS) and len(config.seeds) >= 3
    assert set(config.hparams) <= set(METHODS)
    if name == "compare_cpu":
        assert config.model.name == "smollm2-135m-instruct" and config.model.dtype == "float32"
    else:  # the published setting: bf16 on vLLM, DPO@16, avg@16 at T = 1
        assert config.model.dtype == "bfloat16" and config.backend == "vllm" and config.pairs.k == 16
        assert config.eval.n_samples == 16 and config.eval.temperature == 1.0
        assert [c[3] for c in score_columns(config)] == ["acc test", "avg@16 test", "pass@16 test"]


def test_unknown_methods_are_refused(tmp_path):
    with pytest.raises(ValueError, match="valid methods"):
        run_comparison(CompareConfig(out_dir=str(tmp_path), methods=["sft", "ppo"]))
    with pytest.raises(ValueError, match="unknown key"):
        load_config(None, ["pairs.kk=3"], cls=CompareConfig)


def test_cli_compare_runs_the_comparison_with_the_files_settings_and_overrides(tmp_path, monkeypatch):
    seen = {}

    def fake_run(config):
        seen["config"] = config
        return {"table": "| m |", "notes": [], "out_dir": config.out_dir}

    monkeypatch.setattr(compare, "run_comparison", fake_run)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("seeds: [5]\nmethods: [base, sft]\n")
    assert cli.main(["compare", "--config", str(config_file), "--set", f"out_dir={tmp_path}"]) == 0
    assert seen["config"].seeds == [5] and seen["config"].methods == ["base", "sft"]
    assert seen["config"].out_dir == str(tmp_path)


def test_answered_is_the_share_of_stated_final_answers(tmp_path):
    responses = {"test": ["so \\boxed{3}", "3+1=4\n#### 4", "I think it is 5"], "test_hard": ["\\boxed{1"]}
    for split, texts in responses.items():
        (tmp_path / "eval" / split).mkdir(parents=True)
        (tmp_path / "eval" / split / "results.jsonl").write_text("".join(json.dumps({"response": t}) + "\n" for t in texts))
    assert _answered([tmp_path / "eval"], ["test", "test_hard"]) == pytest.approx(2 / 4)
    assert _answered([tmp_path / "eval"], ["test"]) == pytest.approx(2 / 3)
    assert _answered([tmp_path / "eval", tmp_path / "missing"], ["test"]) is None  # a run that kept no answers
