"""The run-directory helpers every resumable stage uses: atomic writes, the lock, fingerprints."""

import os
import signal
import subprocess
import sys
import time

import pytest

from onpolicy_sft.rundir import DirectoryLocked, InputsChanged, RunLock, check_fingerprint, read_json, write_json

HOLD = "import sys, time; from onpolicy_sft.rundir import RunLock\nwith RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"


def _holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_is_refused_with_the_holders_pid_and_a_kill_releases_the_lock(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(DirectoryLocked, match=f"pid {proc.pid}"):
            with RunLock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead holder's lock: a resume goes ahead
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_fingerprint_is_recorded_then_refuses_a_changed_input_naming_it(tmp_path):
    path = tmp_path / "inputs.json"
    check_fingerprint(path, {"model": "m1", "lr": 1e-5, "data": "abc"}, "training run")
    check_fingerprint(path, {"model": "m1", "lr": 1e-5, "data": "abc"}, "training run")  # same inputs resume
    with pytest.raises(InputsChanged) as err:
        check_fingerprint(path, {"model": "m2", "lr": 1e-5, "data": "abc"}, "training run")
    assert 'model: was "m1", now "m2"' in str(err.value) and "lr" not in str(err.value)
    assert read_json(path)["model"] == "m1"  # the record is not overwritten by the refused run


def test_atomic_write_leaves_no_temporary_file_and_round_trips(tmp_path):
    write_json(tmp_path / "a" / "x.json", {"k": [1, 2.5]})
    assert read_json(tmp_path / "a" / "x.json") == {"k": [1, 2.5]}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
    assert read_json(tmp_path / "missing.json", default={}) == {}
