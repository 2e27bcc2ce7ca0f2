"""The CLI as a user meets it: one `error:` line for every mistake a user can make (traceback only with
--verbose), --columns and --on-error on every subcommand that reads data, `rewrite` driven by the same
--config/--set as the others, `data show` that never floods the terminal, and evaluation sets that
are never the training rows."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import datasets.utils.logging as datasets_logging
import transformers.utils.logging as transformers_logging

from onpolicy_sft.cli import main
from onpolicy_sft.config import DataConfig, EvalConfig, LoopConfig, ModelConfig, ObjectiveConfig, TrainConfig
from onpolicy_sft.config_io import save_config
from onpolicy_sft import console as run_console
from onpolicy_sft.console import native_output_to_log, route_logs
from onpolicy_sft.run_data import load_data
from tiny import SHORT_EXEMPLAR

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}\n#### {i + 1}", "answer": str(i + 1)}
            for i in range(start, start + n)]


def _jsonl(path: Path, rows: list, bad_line: str | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if bad_line is not None:
        lines.insert(1, bad_line)
    path.write_text("\n".join(lines) + "\n")
    return path


def _config_file(tmp_path, tiny_dir, **data) -> Path:
    config = LoopConfig(
        out_dir=str(tmp_path / "run"), backend="hf", model=ModelConfig(name=str(tiny_dir)),
        data=DataConfig(n_train=4, n_test=2, n_test_hard=2, n_general=2, **{"exemplars": SHORT_EXEMPLAR, **data}),
        rewrite={"k_self": 2, "m_hinted": 1, "sampling": {"max_new_tokens": 4}, "hinted": {"max_new_tokens": 4},
                 "progress": False, "shard_size": 2},
        train=TrainConfig(objective=ObjectiveConfig(name="sft"), lr=1e-3, batch_size=2, micro_batch_size=2,
                          trackers=["jsonl"], progress=False, max_length=256),
        eval=EvalConfig(max_new_tokens=4, forgetting_max_new_tokens=4),
    )
    return save_config(config, tmp_path / "config.yaml")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: ")
    return err[-1]


def test_a_bad_config_value_is_one_error_line_and_the_traceback_needs_verbose(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewrite:\n  hinted:\n    beta: x\n")
    for command in (["loop"], ["compare"], ["train", "--out", str(tmp_path / "o")], ["eval"],
                    ["rewrite", "--out", str(tmp_path / "o")]):
        assert main(command + ["--config", str(bad)]) == 2
        assert _error_line(capsys) == f"error: {bad}: rewrite.hinted.beta: expected float, got 'x'"
    assert main(["loop", "--config", str(bad), "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "o"), "--set", "train.lr=fast"]) == 2
    assert _error_line(capsys) == "error: --set train.lr=fast: train.lr: expected float, got 'fast'"


def test_bad_data_and_a_missing_model_are_error_lines(tmp_path, capsys, tiny_dir):
    data_file = _jsonl(tmp_path / "d.jsonl", _rows(3), bad_line="{not json")
    assert main(["data", "show", str(data_file)]) == 1
    line = _error_line(capsys)
    assert str(data_file) in line and "line 2" in line
    config_file = _config_file(tmp_path, tiny_dir)
    assert main(["eval", "--config", str(config_file), "--set", f"model.name={tmp_path / 'no-such-model'}"]) == 1
    assert "no-such-model" in _error_line(capsys)
    assert main(["data", "show", str(data_file), "--columns", "prompt"]) == 1
    assert _error_line(capsys) == "error: --columns: a column mapping is OURS=THEIRS (e.g. prompt=instruction), not 'prompt'"
    assert main(["loop", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert _error_line(capsys) == f"error: config file {tmp_path / 'missing.yaml'} does not exist"


def test_data_show_cuts_huge_fields(tmp_path, capsys, tiny_dir):
    huge = "7 " * 20000 + "\n#### 7"
    data_file = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Say 7.", "response": huge, "answer": "7"}])
    assert main(["data", "show", str(data_file), "--model", str(tiny_dir), "--max-chars", "300"]) == 0
    captured = capsys.readouterr()
    shown = json.loads(captured.out[: captured.out.index("\n}\n") + 2])
    assert shown["response"].startswith(huge[:200]) and shown["response"].endswith(huge[-100:])
    assert len(shown["response"]) < 400 and f"[{len(huge) - 300} characters left out]" in shown["response"]
    assert "1 field(s) longer than 300 characters were cut" in captured.err


def test_columns_and_on_error_reach_train_score_and_rewrite(tmp_path, capsys, tiny_dir):
    rows = [{"q": r["prompt"], "a": r["response"]} for r in _rows(4)]
    data_file = _jsonl(tmp_path / "d.jsonl", rows, bad_line='{"q": "no answer column"}')
    config_file = _config_file(tmp_path, tiny_dir)
    mapping = ["--columns", "prompt=q", "--columns", "response=a"]

    assert main(["train", "--config", str(config_file), "--data", str(data_file), "--out", str(tmp_path / "ckpt")]
                + mapping) == 1  # the bad row stops it by default
    assert "line 2" in _error_line(capsys)
    assert main(["train", "--config", str(config_file), "--data", str(data_file), "--out", str(tmp_path / "ckpt"),
                 "--on-error", "skip"] + mapping) == 0
    assert "skipped 1 rows" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "model.safetensors").exists()

    assert main(["score", "--model", str(tiny_dir), "--data", str(data_file), "--out", str(tmp_path / "score"),
                 "--on-error", "skip"] + mapping) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "score" / "summary.json").read_text())
    assert next(iter(summary.values()))["n"] == 4

    # rewrite: the config's sections, --set overrides and the short flags, and the data options
    out = tmp_path / "rewrite"
    assert main(["rewrite", "--config", str(config_file), "--set", "rewrite.k_self=1", "--m-hinted", "0",
                 "--data", str(data_file), "--on-error", "skip", "--limit", "3", "--out", str(out)] + mapping) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 3
    written = [json.loads(line) for line in (out / "rewritten.jsonl").read_text().splitlines()]
    assert all(row["attempts"] == 1 for row in written)  # k_self=1 from --set, m_hinted=0 from the flag
    assert written[0]["prompt"] == rows[0]["q"]


def test_rewrite_triage_keep_verified_and_adaptive_from_the_cli(tmp_path, capsys, tiny_dir):
    data_file = _jsonl(tmp_path / "d.jsonl", _rows(4))
    config_file = _config_file(tmp_path, tiny_dir)
    # A bad value stops the command before any model loads, naming its path.
    assert main(["rewrite", "--config", str(config_file), "--data", str(data_file), "--out", str(tmp_path / "bad"),
                 "--keep-verified", "0"]) == 2
    assert "rewrite.keep_verified: must be >= 1" in _error_line(capsys) and not (tmp_path / "bad").exists()
    out = tmp_path / "rewrite"
    # a level of -1000 lets every row pass the test (mean φ of the near-uniform tiny model is about 0)
    assert main(["rewrite", "--config", str(config_file), "--data", str(data_file), "--out", str(out),
                 "--triage", "phi", "--triage-level", "-1000", "--keep-verified", "2", "--adaptive"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["triage"] == {"by": "phi", "level": -1000.0, "in_distribution": 4}
    assert stats["per_source"]["in_distribution"] == 4 and stats["attempts"]["self"]["answers"] == 0
    written = [json.loads(line) for line in (out / "rewritten.jsonl").read_text().splitlines()]
    assert [r["source"] for r in written] == ["in_distribution"] * 4 and [r["copy"] for r in written] == [0] * 4
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["config.keep_verified"] == 2 and fingerprint["config.adaptive"] is True
    assert fingerprint["config.triage.by"] == "phi"
    # and a level of 1000 flags every row, so all are rewritten
    again = tmp_path / "again"
    assert main(["rewrite", "--config", str(config_file), "--data", str(data_file), "--out", str(again),
                 "--triage", "phi", "--triage-level", "1000", "--keep-verified", "2", "--adaptive"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["triage"]["in_distribution"] == 0
    assert stats["attempts"]["self"]["rows"] == 4 and stats["training_rows"] == sum(stats["per_source"].values())


def test_a_file_source_needs_named_evaluation_sets(tmp_path, capsys, tiny_dir):
    train_file = _jsonl(tmp_path / "train.jsonl", _rows(6))
    with pytest.raises(ValueError, match=r"data\.eval_sources"):
        load_data(DataConfig(source=str(train_file)))
    config_file = _config_file(tmp_path, tiny_dir, source=str(train_file))
    assert main(["eval", "--config", str(config_file)]) == 1
    assert "data.eval_sources" in _error_line(capsys)

    test_file = _jsonl(tmp_path / "test.jsonl", _rows(3, start=100))
    loaded = load_data(DataConfig(source=str(train_file), eval_sources={"test": str(test_file)}, n_test=2))
    assert list(loaded.evals) == ["test"] and len(loaded.evals["test"]) == 2 and len(loaded.train) == 6
    assert loaded.evals["test"]["prompt"][0] == "What is 100 + 1?"

    leaky = _jsonl(tmp_path / "leaky.jsonl", _rows(2, start=100) + _rows(1, start=4))
    with pytest.raises(ValueError, match=r"1 of the 3 rows of evaluation set 'test' .* also in the training data"):
        load_data(DataConfig(source=str(train_file), eval_sources={"test": str(leaky)}))


def test_a_held_out_set_is_carved_off_deterministically(tmp_path):
    train_file = _jsonl(tmp_path / "train.jsonl", _rows(10))
    config = DataConfig(source=str(train_file), holdout=3, n_test=3, seed=5)
    first, again = load_data(config), load_data(config)
    assert list(first.evals) == ["heldout"] and config.eval_names == ["heldout"]
    assert first.evals["heldout"]["prompt"] == again.evals["heldout"]["prompt"]
    held, kept = set(first.evals["heldout"]["prompt"]), set(first.train["prompt"])
    assert len(held) == 3 and len(kept) == 7 and not held & kept
    assert held | kept == {r["prompt"] for r in _rows(10)}
    assert any("3 rows carved off" in note for note in first.notes)
    other = load_data(DataConfig(source=str(train_file), holdout=3, n_test=3, seed=6))
    assert set(other.evals["heldout"]["prompt"]) != held  # the seed decides the draw


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    before = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in before[0]]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(before[1])
    logging.captureWarnings(False)
    run_console._quiet_log.clear()


def test_library_output_goes_to_the_run_log_unless_verbose(tmp_path, capfd, restore_logging):
    chatter = [(transformers_logging.get_logger("transformers.modeling_utils"), "Removed shared tensor"),
               (logging.getLogger("vllm.model_executor"), "ParallelLMHead: Failed to load weights"),
               (datasets_logging.get_logger("datasets.arrow_dataset"), "Caching processed dataset"),
               (logging.getLogger("accelerate.accelerator"), "Mixed precision type")]
    datasets_logging.set_verbosity_info()  # as a library may set it: the level must not reach the console
    route_logs(tmp_path / "run.log", verbose=False)
    for logger, text in chatter:
        logger.warning(text)
        logger.info(text + " (info)")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # whatever filters earlier tests left
        warnings.warn("a library's deprecation")
    logging.getLogger("onpolicy_sft.loop").warning("a warning of ours")
    logging.getLogger("vllm.engine").error("an engine error")
    console = capfd.readouterr().err
    # datasets and transformers come with console handlers of their own: they must be gone
    assert not logging.getLogger("datasets").handlers and not logging.getLogger("transformers").handlers
    assert all(text not in console for _, text in chatter) and "deprecation" not in console
    assert "a warning of ours" in console and "an engine error" in console
    with native_output_to_log():  # what C++ code writes at vLLM's engine start
        os.write(2, b"Warning: NUMA binding from native code\n")
    assert "NUMA binding" not in capfd.readouterr().err
    log = (tmp_path / "run.log").read_text()
    assert "NUMA binding from native code" in log
    assert all(text in log and text + " (info)" in log for _, text in chatter) and "deprecation" in log

    route_logs(tmp_path / "verbose.log", verbose=True)
    for logger, text in chatter:
        logger.info(text)
    console = capfd.readouterr().err
    assert all(text in console for _, text in chatter)
    assert all(text in (tmp_path / "verbose.log").read_text() for _, text in chatter)


def test_a_refused_loop_or_rewrite_names_the_holding_stage_and_writes_nothing(tmp_path, capsys, tiny_dir,
                                                                              lock_holder):
    config_file = _config_file(tmp_path, tiny_dir)
    run = tmp_path / "run"
    run.mkdir()
    holder = lock_holder(run, "train")
    before = sorted(p.name for p in run.iterdir())
    assert main(["loop", "--config", str(config_file)]) == 1
    assert _error_line(capsys).startswith(f"error: {run} is in use by another stage (train, pid {holder.pid})")
    assert main(["rewrite", "--config", str(config_file), "--out", str(run)]) == 1
    assert f"(train, pid {holder.pid})" in _error_line(capsys)
    assert main(["eval", "--config", str(config_file), "--out", str(run)]) == 1
    assert f"(train, pid {holder.pid})" in _error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == before  # no run.log, nothing at all


@pytest.mark.parametrize("override, field", [
    ("train.batch_size=0", "train.batch_size"), ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.max_length=0", "train.max_length"), ("train.epochs=0", "train.epochs"), ("train.lr=-1", "train.lr"),
    ("train.lr=.nan", "train.lr"), ("train.lr=.inf", "train.lr"), ("train.adam_betas=[0.9]", "train.adam_betas"),
    ("train.seed=-1", "train.seed"),
])
def test_a_bad_loop_value_stops_before_any_model_loads_naming_its_path(override, field, tmp_path, capsys, tiny_dir,
                                                                        monkeypatch):
    from transformers import AutoModelForCausalLM

    # The class every model load goes through, whichever module imported load_model.
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("a model loaded before the config was checked"))
    config_file = _config_file(tmp_path, tiny_dir)
    assert main(["loop", "--config", str(config_file), "--set", override]) == 2
    assert _error_line(capsys).startswith(f"error: --set {override}: {field}: must be")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_is_one_line_that_says_the_resume_is_exact(tmp_path, capsys, tiny_dir, monkeypatch):
    import onpolicy_sft.train as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "step_gradients", interrupted)  # Ctrl-C in the middle of the first step
    config_file = _config_file(tmp_path, tiny_dir)
    assert main(["train", "--config", str(config_file), "--out", str(tmp_path / "ckpt")]) == 130
    assert _error_line(capsys) == ("error: interrupted; rerun the same command to resume train from its last saved "
                                   "work, with the same result as an uninterrupted run")


def test_a_cut_weights_file_is_one_line_naming_it(tmp_path, capsys, tiny_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    assert main(["eval", "--config", str(_config_file(tmp_path, tiny_dir)), "--model", str(model)]) == 1
    line = _error_line(capsys)
    assert f"{weights} is damaged or cut short" in line and "copy or convert the checkpoint again" in line


def test_a_cut_rewrite_shard_is_generated_again_with_the_same_rows(tmp_path, capsys, tiny_dir):
    config_file = _config_file(tmp_path, tiny_dir)
    out = tmp_path / "rewrite"
    command = ["rewrite", "--config", str(config_file), "--data", "arithmetic", "--limit", "4", "--out", str(out)]
    assert main(command) == 0
    first = (out / "rewritten.jsonl").read_text()
    shard = out / "shards" / "00001.json"
    shard.write_text(shard.read_text()[:-40])  # cut inside its last row
    capsys.readouterr()
    assert main(command) == 0
    assert f"rewrite: saved work {shard} is damaged" in capsys.readouterr().err
    assert (out / "rewritten.jsonl").read_text() == first


def test_a_mapping_that_feeds_one_column_to_two_fields_is_refused(tmp_path, capsys):
    data_file = _jsonl(tmp_path / "d.jsonl", _rows(3))
    assert main(["data", "show", str(data_file), "--columns", "prompt=response"]) == 1
    assert _error_line(capsys) == ("error: columns: the column 'response' would feed 'response' and 'prompt'; map "
                                   "each of our fields from its own column (e.g. --columns prompt=OTHER)")
    # In pairs, a source column named like one of our demonstration fields is free to feed one field.
    pairs = _jsonl(tmp_path / "r.jsonl", [{"prompt": "Q?", "response": "good", "bad": "poor"}])
    assert main(["data", "show", str(pairs), "--preferences", "--columns", "chosen=response",
                 "--columns", "rejected=bad"]) == 0
    capsys.readouterr()
    pairs = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "A 7", "rejected": "A 7 "},
                                          {"prompt": "Q2?", "chosen": "yes", "rejected": "no"}])
    assert main(["data", "show", str(pairs), "--preferences"]) == 1
    assert _error_line(capsys) == (f"error: {pairs}: line 1: field 'rejected': chosen and rejected are the same "
                                   "text, so the pair prefers nothing")
    assert main(["data", "show", str(pairs), "--preferences", "--on-error", "skip"]) == 0
    assert "skipped 1 rows ({'same_sides': 1})" in capsys.readouterr().err
