"""FSDP2 on 2 CPU processes (torchrun, gloo): the 1-process losses and weights, for a token
objective and for DPO, and an exact resume from an FSDP checkpoint after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fsdp_run import run
from onpolicy_sft.train_state import DONE_FILE, STATE_DIR

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TESTS = Path(__file__).parent


def _torchrun(out_dir: Path, objective: str, kill_after: int = 0, long: bool = False) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(torchrun), "--nproc_per_node", "2", str(TESTS / "fsdp_run.py"), str(out_dir), objective, "1",
           str(kill_after), "1" if long else "0"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "logs" / "train" / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a_dir: Path, b_dir: Path, tol: float) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=tol, atol=tol, msg=key)


@pytest.fixture(scope="module")
def two_process_sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "sft"
    result = _torchrun(out, "sft")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("objective, long", [("sft", False), ("dpo", False), ("idft", True)])
def test_fsdp_two_processes_match_one_process_float64(objective, long, two_process_sft, tmp_path):
    """long: the 2 FSDP processes also pack their micro-batches and checkpoint activations; the
    1-process run does neither."""
    if objective == "sft":
        two = two_process_sft
    else:
        two = tmp_path / "two"
        result = _torchrun(two, objective, long=long)
        assert result.returncode == 0, result.stderr[-3000:]
    one = tmp_path / "one"
    run(str(one), objective, fsdp=False)
    for rank in (0, 1):  # both processes trained on shards, not on full copies
        assert json.loads((two / f"sharded_{rank}.json").read_text()) == {"sharded": True}
    assert json.loads((one / "sharded_0.json").read_text()) == {"sharded": False}
    _assert_same_weights(one, two, 1e-12)
    log_one, log_two = _log(one), _log(two)
    assert [r["step"] for r in log_two] == [1, 2, 3, 4]  # written once, by the main process
    for a, b in zip(log_one, log_two):
        for key in ("train/loss", "train/grad_norm", "train/units"):
            assert b[key] == pytest.approx(a[key], rel=1e-10), key
    assert json.loads((two / DONE_FILE).read_text())["processes"] == 2


def test_fsdp_resume_after_kill_matches_uninterrupted(two_process_sft, tmp_path):
    """Both processes are killed after step 3 (state of step 2 saved, gathered from the shards);
    a new 2-process run scatters it back and ends with exactly the uninterrupted weights."""
    out = tmp_path / "resumed"
    killed = _torchrun(out, "sft", kill_after=3)
    assert killed.returncode != 0
    assert json.loads((out / STATE_DIR / "latest.json").read_text())["step"] == 2
    assert not (out / DONE_FILE).exists()
    resumed = _torchrun(out, "sft")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming training at step 2/4" in resumed.stderr
    _assert_same_weights(two_process_sft, out, 0.0)
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]
