"""The run-directory helpers every resumable stage uses: atomic writes, the lock, fingerprints."""

import os
import signal
import subprocess
import sys

import pytest

from onpolicy_sft.rundir import (DirectoryLocked, InputsChanged, RunLock, check_fingerprint, read_json, replace_with,
                                 save_into, write_json, write_text)

def test_second_run_is_refused_with_the_holders_pid_and_a_kill_releases_the_lock(tmp_path, lock_holder):
    proc = lock_holder(tmp_path)
    with pytest.raises(DirectoryLocked, match=f"pid {proc.pid}"):
        with RunLock(tmp_path):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead holder's lock: a resume goes ahead
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()} run"


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


def test_one_lock_whatever_the_stage_and_the_refusal_names_the_holder(tmp_path, lock_holder):
    proc = lock_holder(tmp_path, "train")
    for stage in ("score", "loop", "rewrite"):
        with pytest.raises(DirectoryLocked, match=rf"in use by another stage \(train, pid {proc.pid}\).* this {stage} "):
            with RunLock(tmp_path, stage):
                pass


def test_the_process_holding_the_lock_may_take_it_again_and_releases_it_at_the_outer_exit(tmp_path, lock_holder):
    with RunLock(tmp_path, "loop"):
        with RunLock(tmp_path / ".." / tmp_path.name, "train"):  # the same directory, spelled another way
            pass
        take = "import sys; from onpolicy_sft.rundir import RunLock\nwith RunLock(sys.argv[1], 'x'):\n    pass"
        proc = subprocess.run([sys.executable, "-c", take, str(tmp_path)], capture_output=True, text=True)
        assert "DirectoryLocked" in proc.stderr and "(loop, pid" in proc.stderr
    lock_holder(tmp_path)  # released: another process takes it


def test_planted_symlinks_are_replaced_never_written_through(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    for name in ("report.md", ".lock", "model.safetensors", "plot.png", "weights"):
        (outside / name).write_text("precious")
        (out / name).symlink_to(outside / name)
    write_text(out / "report.md", "new")
    replace_with(out / "plot.png", lambda tmp: tmp.write_text("png"))
    save_into(out, lambda folder: (folder / "model.safetensors").write_text("tensors"))
    save_into(out, lambda folder: (folder / "weights").mkdir())
    with RunLock(out, "score"):
        pass
    assert all((outside / name).read_text() == "precious" for name in ("report.md", ".lock", "model.safetensors",
                                                                       "plot.png", "weights"))
    assert not any(p.is_symlink() for p in out.iterdir())
    assert (out / "report.md").read_text() == "new" and (out / "model.safetensors").read_text() == "tensors"
    assert (out / "weights").is_dir() and sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]
