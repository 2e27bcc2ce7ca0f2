"""The run layer (onpolicy_sft/run.py) in one process: the lock, the fingerprint, main-only writes,
and the two maps over rows (order, the split record, resume of saved units)."""

import json
import logging

import pytest

from onpolicy_sft.run import FINGERPRINT, RunDir, map_shards, map_shares
from onpolicy_sft.rundir import DirectoryLocked, InputsChanged


def test_run_dir_refuses_a_resume_with_other_inputs_naming_the_change(tmp_path):
    with RunDir(tmp_path, "stage", {"lr": 1.0, "rows": 4}):
        pass
    with pytest.raises(InputsChanged, match=r"lr: was 1\.0, now 2\.0"):
        with RunDir(tmp_path, "stage", {"lr": 2.0, "rows": 4}):
            pass
    with RunDir(tmp_path, "stage", {"lr": 1.0, "rows": 4}):  # the same inputs resume
        pass
    assert json.loads((tmp_path / FINGERPRINT).read_text()) == {"lr": 1.0, "rows": 4}


def test_run_dir_restart_forgets_inputs_of_work_that_left_nothing(tmp_path):
    with RunDir(tmp_path, "stage", {"lr": 1.0}) as run:
        run.check_inputs({"lr": 2.0}, restart=True)
    assert json.loads((tmp_path / FINGERPRINT).read_text()) == {"lr": 2.0}


def test_run_dir_is_one_run_at_a_time_across_processes(tmp_path):
    import subprocess
    import sys
    import textwrap

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from onpolicy_sft.run import RunDir
        with RunDir({str(tmp_path)!r}, "holder"):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryLocked, match="holder"):
            with RunDir(tmp_path, "second"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_run_dir_without_a_directory_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with RunDir(None, "stage", {"a": 1}) as run:
        run.write_json("x.json", {"a": 1})
        run.write_jsonl("y.jsonl", [{"a": 1}])
        assert run.file("x.json") is None and not run.exists("x.json")
    assert list(tmp_path.iterdir()) == []


def test_run_dir_writes_jsonl_rows_in_order(tmp_path):
    with RunDir(tmp_path, "stage") as run:
        run.write_jsonl("rows.jsonl", [{"i": 2}, {"i": 1}])
        assert run.exists("rows.jsonl")
    assert [json.loads(line)["i"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == [2, 1]


def test_map_shares_calls_once_and_returns_results_in_order():
    calls = []

    def square(indices):
        calls.append(list(indices))
        return [i * i for i in indices]

    mapped = map_shares(square, 5, "squares")
    assert calls == [[0, 1, 2, 3, 4]]
    assert mapped.results == [0, 1, 4, 9, 16]
    assert mapped.record() == {"processes": 1, "rows_per_process": [5]}


def test_map_shares_refuses_a_short_answer():
    with pytest.raises(RuntimeError, match="2 results for 3 rows"):
        map_shares(lambda indices: indices[:2], 3, "short")


def test_map_shards_resumes_saved_units_and_recomputes_damaged_ones(tmp_path, caplog):
    units = [[0, 1], [2, 3], [4]]
    first = map_shards(lambda u: [10 * i for i in u], units, "tens", sizes=[2, 2, 1], save_dir=tmp_path)
    assert first.results == [[0, 10], [20, 30], [40]]
    assert first.rows_per_process == [5]
    (tmp_path / "00001.json").write_text('{"unit": [2, 3], "res')  # cut short by a kill
    (tmp_path / "00002.json").write_text(json.dumps({"unit": [9], "result": [90]}))  # another unit's work
    computed = []

    def tens(unit):
        computed.append(unit)
        return [10 * i for i in unit]

    with caplog.at_level(logging.WARNING):
        again = map_shards(tens, units, "tens", save_dir=tmp_path)
    assert again.results == first.results
    assert computed == [[2, 3], [4]]
    assert "damaged" in caplog.text
    assert map_shards(tens, units, "tens", save_dir=tmp_path).results == first.results
    assert computed == [[2, 3], [4]]  # everything saved now: nothing computed


def test_map_shards_tally_counts_every_unit(capsys):
    seen = {}

    def postfix(totals):
        seen.update(totals)
        return dict(totals)

    map_shards(lambda u: u, ["a", "b", "a"], "letters", tally=lambda r: {r: 1}, postfix=postfix, progress=True)
    assert seen == {"a": 2, "b": 1}


def test_check_inputs_names_the_saved_work_it_refuses(tmp_path):
    with RunDir(tmp_path, "training run", {"lr": 1.0}):
        pass
    with pytest.raises(InputsChanged, match="holds a finished training run started with other inputs"):
        with RunDir(tmp_path, "training run") as run:
            run.check_inputs({"lr": 2.0}, what="finished training run")


def test_save_dataset_writes_on_the_main_process_and_nothing_without_a_directory(tmp_path):
    import datasets

    from onpolicy_sft.run import save_dataset

    rows = datasets.Dataset.from_list([{"prompt": "a", "response": "b"}])
    save_dataset(RunDir(tmp_path, "stage"), "round_1/corpus/dataset", rows)
    assert datasets.load_from_disk(str(tmp_path / "round_1" / "corpus" / "dataset"))["prompt"] == ["a"]
    assert [p.name for p in (tmp_path / "round_1" / "corpus").iterdir()] == ["dataset"]  # no staging left
    save_dataset(RunDir(None, "stage"), "dataset", rows)
    assert not (tmp_path / "dataset").exists()


def test_a_refused_run_dir_lets_its_lock_go(tmp_path, lock_holder):
    with RunDir(tmp_path, "stage", {"lr": 1.0}):
        pass
    with pytest.raises(InputsChanged):
        with RunDir(tmp_path, "stage", {"lr": 2.0}):
            pass
    lock_holder(tmp_path)  # another process can take the lock: the refusal did not keep it
