"""Evaluation, forgetting, base responses, preference pairs and DDT scoring on 2 CPU processes
(torchrun, gloo) give exactly the one-process results and record how the rows were shared."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

STAGES = Path(__file__).with_name("data_parallel_stages.py")


def _run(launcher: list[str], model_dir: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([*launcher, str(STAGES), str(model_dir), str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def _same(a, b, path="") -> None:
    """Equal, with NaN equal to NaN (unscored rows)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


SPLIT_KEYS = ("processes", "rows_per_process")


@pytest.mark.slow
def test_two_processes_equal_one(tiny_dir, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    one = _run([sys.executable], tiny_dir, tmp_path / "one")
    two = _run([torchrun, "--nproc_per_node", "2"], tiny_dir, tmp_path / "two")

    # The split is recorded...
    for record in (two["metrics"], two["forgetting"], two["pair_counts"]):
        assert record["processes"] == 2 and sum(record["rows_per_process"]) == 5
    assert two["metrics"]["rows_per_process"] == [3, 2] and two["pair_counts"]["rows_per_process"] == [3, 2]
    assert two["forgetting"]["rows_per_process"] == [3, 2]  # batches of 2 prompts: [0, 1] + [4] and [2, 3]
    assert two["ddt_record"]["processes"] == 2 and sum(two["ddt_record"]["rows_per_process"]) == 5
    assert one["metrics"]["processes"] == 1 and one["metrics"]["rows_per_process"] == [5]
    # ...and nothing else differs: greedy and sampled answers, their grades, the KL, pairs and scores.
    for results in (one, two):
        for record in (results["metrics"], results["forgetting"], results["pair_counts"], results["ddt_record"]):
            for key in SPLIT_KEYS:
                record.pop(key)
    _same(one, two)
    assert one["metrics"]["n_examples"] == 5 and len(one["eval_rows"]) == 5
    assert one["forgetting"]["kl"] > 0 and len(one["pairs"]) == one["pair_counts"]["kept"] > 0
