"""Trainer: step plan, normalisation invariance (float64), overfitting, resume after kill, checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from onpolicy_sft.config import ObjectiveConfig, TrainConfig
from onpolicy_sft.ops import IGNORE_INDEX
from onpolicy_sft.train import ObjectiveModel, step_gradients, train
from onpolicy_sft.train_data import plan_steps
from onpolicy_sft.train_state import DONE_FILE

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(tokenizer, n, seed=0):
    """Tokenized rows with different prompt and response lengths (so micro-batches differ in size)."""
    from onpolicy_sft.encoding import encode_example

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = torch.randint(1, 99, (2,), generator=g).tolist()
        response = f"{a}+{b}=" + "x" * int(torch.randint(1, 12, (1,), generator=g)) + f" {a + b}"
        rows.append({"prompt": f"add {a} and {b}" + "!" * (i % 3), "response": response})
    import datasets

    ds = datasets.Dataset.from_list(rows)
    return ds.map(lambda r: encode_example(tokenizer, r["prompt"], r["response"]))


def _config(**kw):
    base = dict(lr=1e-2, batch_size=8, micro_batch_size=8, epochs=1.0, warmup_ratio=0.0, max_grad_norm=None,
                trackers=["jsonl"], progress=False, objective=ObjectiveConfig(name="sft"))
    base.update(kw)
    return TrainConfig(**base)


def test_plan_steps_covers_every_row_once_and_fixes_step_contents():
    lengths = [5, 9, 2, 7, 7, 3, 11, 4, 6, 8, 1]
    one = plan_steps(lengths, batch_size=4, micro_batch_size=4, seed=3)
    two = plan_steps(lengths, batch_size=4, micro_batch_size=1, num_processes=2, seed=3)
    flat = sorted(i for step in one for proc in step for mb in proc for i in mb)
    assert flat == list(range(len(lengths)))
    for a, b in zip(one, two):
        assert sorted(i for proc in a for mb in proc for i in mb) == sorted(i for proc in b for mb in proc for i in mb)
        assert len(b[0]) == len(b[1])  # every process runs the same number of micro-batches
    # length grouping: within a step the micro-batches come in non-increasing length order
    for step in two:
        ordered = [lengths[i] for mb in sorted((mb for proc in step for mb in proc), key=lambda m: -lengths[m[0]] if m else 0) for i in mb]
        assert ordered == sorted(ordered, reverse=True)
    epochs = plan_steps(lengths, batch_size=5, micro_batch_size=5, epochs=2.0, seed=0)
    counts = torch.bincount(torch.tensor([i for s in epochs for p in s for mb in p for i in mb]))
    assert counts.tolist() == [2] * len(lengths)


def test_a_budget_in_rows_gives_the_same_steps_whatever_the_corpus_size():
    small, large = [3] * 6, [3] * 15
    plans = [plan_steps(lengths, batch_size=4, micro_batch_size=4, epochs=5.0, rows=12) for lengths in (small, large)]
    assert [len(p) for p in plans] == [3, 3]  # 12 rows in steps of 4, epochs ignored
    counts = torch.bincount(torch.tensor([i for s in plans[0] for p in s for mb in p for i in mb]))
    assert counts.tolist() == [2] * 6  # the small corpus is gone through twice, each row once per epoch


def _full_batch_token_mean_grads(model, batch):
    """Independent reference: SFT token mean over the whole step, from the full logits."""
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum") / (labels != IGNORE_INDEX).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_normalisation_is_invariant_to_micro_batching_float64(tiny_tokenizer):
    from onpolicy_sft.encoding import collate
    from onpolicy_sft.objectives import build
    from tiny import make_tiny_model

    ds = _rows(tiny_tokenizer, 8)
    model = make_tiny_model(tiny_tokenizer, seed=1, dtype=torch.float64)
    pad = tiny_tokenizer.pad_token_id
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds]
    ref_loss, ref_grads = _full_batch_token_mean_grads(model, collate(rows, pad))
    wrapped = ObjectiveModel(model, build("sft"))
    for micro in (8, 2, 1):
        model.zero_grad()
        batches = [collate(rows[i : i + micro], pad) for i in range(0, 8, micro)]
        loss, _, units, _ = step_gradients(wrapped, batches, pairwise=False, progress=0.0)
        assert units == sum((torch.tensor(r["labels"][1:]) != IGNORE_INDEX).sum().item() for r in rows)
        assert loss == pytest.approx(float(ref_loss), rel=1e-12)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-10, atol=1e-13, msg=name)


class _FakeProcessGroup:
    """What step_gradients asks of accelerate, for ``num_processes`` processes simulated one after another."""

    def __init__(self, num_processes, local_units_of_all):
        self.num_processes, self.device, self.totals = num_processes, torch.device("cpu"), local_units_of_all

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return torch.tensor(float(sum(self.totals)))

    def no_sync(self, module):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def test_normalisation_is_invariant_to_process_count_float64(tiny_tokenizer):
    """Two simulated data-parallel processes: each scales by the GLOBAL token count, DDP averages the
    two gradients, and the result is the single-process token-mean gradient."""
    from onpolicy_sft.encoding import collate
    from onpolicy_sft.objectives import build
    from onpolicy_sft.train import count_units
    from tiny import make_tiny_model

    ds = _rows(tiny_tokenizer, 7, seed=3)
    model = make_tiny_model(tiny_tokenizer, seed=1, dtype=torch.float64)
    pad = tiny_tokenizer.pad_token_id
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds]
    _, ref_grads = _full_batch_token_mean_grads(model, collate(rows, pad))
    (step,) = plan_steps([len(r["input_ids"]) for r in rows], batch_size=7, micro_batch_size=2, num_processes=2)
    per_process = [[collate([rows[i] for i in mb], pad) if mb else None for mb in proc] for proc in step]
    units = [sum(count_units(b, False) for b in proc if b is not None) for proc in per_process]
    assert all(units) and units[0] != units[1]  # uneven shares: a per-process mean would be wrong
    wrapped = ObjectiveModel(model, build("sft"))
    summed = None
    for batches in per_process:
        model.zero_grad()
        step_gradients(wrapped, batches, pairwise=False, progress=0.0, accelerator=_FakeProcessGroup(2, units))
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        summed = grads if summed is None else {n: summed[n] + g for n, g in grads.items()}
    for name, g in summed.items():
        torch.testing.assert_close(g / 2, ref_grads[name], rtol=1e-10, atol=1e-13, msg=name)  # DDP's mean


def test_train_1x8_equals_4x2_float64(tiny_tokenizer, tmp_path):
    from tiny import make_tiny_model

    ds = _rows(tiny_tokenizer, 16)
    start = {n: p.detach().clone() for n, p in make_tiny_model(tiny_tokenizer, seed=2, dtype=torch.float64).named_parameters()}
    results = []
    for micro in (8, 2):
        model = make_tiny_model(tiny_tokenizer, seed=2, dtype=torch.float64)
        train(model, tiny_tokenizer, ds, _config(micro_batch_size=micro, max_grad_norm=1.0, warmup_ratio=0.5),
              out_dir=tmp_path / f"m{micro}")
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-9, atol=1e-12, msg=name)
    # Two runs that trained nothing would also agree: the weights must have left the start.
    moved = [name for name in start if (results[0][name] - start[name]).abs().max() > 1e-6]
    assert len(moved) == len(start), sorted(set(start) - set(moved))


def test_finished_training_saves_reloadable_weights_and_logs_every_step(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    from tiny import make_tiny_model

    model = make_tiny_model(tiny_tokenizer, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = train(model, tiny_tokenizer, _rows(tiny_tokenizer, 12), _config(batch_size=4, micro_batch_size=2),
                 out_dir=tmp_path / "ckpt")
    assert (path / DONE_FILE).exists() and not (path / "trainer_state").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    changed = False
    for name, p in reloaded.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name], rtol=0, atol=0)
        changed |= not torch.equal(p, before[name])
    assert changed
    log = [json.loads(line) for line in (path / "logs" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in log)


def test_rejects_labels_without_response_tokens(tiny_tokenizer, tmp_path):
    import datasets
    from tiny import make_tiny_model

    ds = datasets.Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}] * 2)
    with pytest.raises(ValueError, match="no response tokens"):
        train(make_tiny_model(tiny_tokenizer), tiny_tokenizer, ds, _config(), out_dir=tmp_path)


OBJECTIVES = {
    "sft": {}, "dft": {}, "power": {"alpha": 0.5}, "eaft": {}, "threshold": {"tau": 0.01}, "label_smoothing": {"epsilon": 0.1},
    "sft_kl": {"lam": 0.1}, "asft": {"lam": 0.1}, "distill": {}, "hybrid_distill": {"lam": 0.5},
    "target_sft": {"eta": 0.5}, "idft": {}, "dpo": {"beta": 0.1}, "simpo": {},
}


def _data_nll(model, tokenizer, ds) -> float:
    from onpolicy_sft.encoding import collate

    batch = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_falls_on_tiny_overfit_set(name, tiny_tokenizer, tmp_path):
    """A few full-batch steps on 4 rows must fit them, for every objective.

    What falls depends on the objective: the reported value of DFT-like objectives is
    −sg(w)·ℓ, which grows as p_y does, so for every objective that trusts the labels we
    check the data's NLL; for pure distillation and DPO/SimPO the reported loss is a proper
    loss of the current model, and we check that.
    """
    import datasets
    from onpolicy_sft.objectives import build
    from tiny import make_tiny_model

    objective = build(name, **OBJECTIVES[name])
    model = make_tiny_model(tiny_tokenizer, seed=0)
    teacher = make_tiny_model(tiny_tokenizer, seed=5)  # a different distribution to distil toward
    if objective.pairwise:
        ds = datasets.Dataset.from_list(
            [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad answer {i}"} for i in range(4)]
        )
    else:
        ds = _rows(tiny_tokenizer, 4)
    before = None if objective.pairwise else _data_nll(model, tiny_tokenizer, ds)
    config = _config(batch_size=4, micro_batch_size=2, lr=3e-3, epochs=8.0)
    out = tmp_path / name
    train(model, tiny_tokenizer, ds, config, out_dir=out, objective=objective, teacher=teacher)
    losses = [json.loads(l)["train/loss"] for l in (out / "logs" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    if objective.pairwise or name == "distill":
        assert losses[-1] < losses[0] - 1e-3, losses
    else:
        after = _data_nll(model, tiny_tokenizer, ds)
        assert after < before - 0.05, (before, after)


def kill_after(steps: int):
    """An ``on_step`` callback that SIGKILLs this process once ``steps`` optimizer steps are done."""

    def on_step(done: int) -> None:
        if done == steps:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def _resume_run(out_dir, kill_after_step: int | None = None, on_step=None):
    """The run the resume test kills and repeats: 5 steps, state saved every 2, warmup and clipping on."""
    from tiny import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok, seed=4)
    train(model, tok, _rows(tok, 20), _config(batch_size=4, micro_batch_size=2, lr=1e-2, warmup_ratio=0.2,
          max_grad_norm=1.0, save_every=2), out_dir=out_dir,
          on_step=kill_after(kill_after_step) if kill_after_step else on_step)


KILLED_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_train import _resume_run
    _resume_run(sys.argv[1], kill_after_step=int(sys.argv[2]))
    """
)


class _Planted:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickles(state_root: Path, marker: Path) -> None:
    """Malicious pickles under every name accelerate's save_state used, in the state root and its step dirs."""
    import pickle

    payload = pickle.dumps(_Planted(marker))
    for directory in [state_root, *state_root.glob("step_*")]:
        for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "pytorch_model.bin",
                     "scheduler.bin", "scaler.pt"):
            (directory / name).write_bytes(payload)


def _steps_logged(out_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "logs" / "train" / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    """SIGKILL after step 3 of 5 (state saved at step 2) in a child process; resuming here replays
    step 3 and must end with exactly the weights of an uninterrupted run. Pickles planted in the
    state directory are never unpickled, and the metrics log holds every step once."""
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(KILLED_SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "resumed"), "3"], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state_root = tmp_path / "resumed" / "trainer_state"
    assert json.loads((state_root / "latest.json").read_text())["step"] == 2
    assert not (tmp_path / "resumed" / DONE_FILE).exists()
    assert _steps_logged(tmp_path / "resumed") == [1, 2, 3]  # step 3 was logged, then lost with the kill
    marker = tmp_path / "pickle_ran"
    _plant_pickles(state_root, marker)
    replayed = []
    _resume_run(tmp_path / "resumed", on_step=replayed.append)
    _resume_run(tmp_path / "straight")
    assert replayed == [3, 4, 5]  # resumed from the state of step 2, not started over
    assert not marker.exists()
    assert _steps_logged(tmp_path / "resumed") == [1, 2, 3, 4, 5]
    a = load_file(tmp_path / "resumed" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_state_round_trips_optimizer_scheduler_and_rng(tiny_tokenizer, tmp_path):
    """save_state then load_state into fresh objects restores every tensor and number exactly."""
    import random

    import numpy as np
    from accelerate import Accelerator
    from onpolicy_sft.train import setup_optimizer
    from onpolicy_sft.train_state import load_state, save_state
    from tiny import make_tiny_model

    model = make_tiny_model(tiny_tokenizer, seed=0)
    config = _config(warmup_ratio=0.3)
    optimizer, scheduler = setup_optimizer(model, config, total_steps=10)
    for _ in range(3):
        model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    save_state(accelerator, model, optimizer, scheduler, tmp_path, 3)
    expected = (torch.rand(3), random.random(), np.random.rand())
    fresh = make_tiny_model(tiny_tokenizer, seed=1)
    fresh_opt, fresh_sched = setup_optimizer(fresh, config, total_steps=10)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    load_state(accelerator, fresh, fresh_opt, fresh_sched, tmp_path / "trainer_state" / "step_3")
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    saved, loaded = optimizer.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, per_param in saved["state"].items():
        for key, value in per_param.items():
            assert torch.equal(value, loaded["state"][index][key]), (index, key)
    assert fresh_sched.state_dict() == scheduler.state_dict() and fresh_sched.get_last_lr() == scheduler.get_last_lr()
    assert not list((tmp_path / "trainer_state").rglob("*.pkl")) and not list((tmp_path / "trainer_state").rglob("*.bin"))


def _short_run(tok, out_dir, rows=None, model_seed=4, on_step=None, **config):
    from tiny import make_tiny_model

    model = make_tiny_model(tok, seed=model_seed)
    settings = dict(batch_size=4, micro_batch_size=4, save_every=1, max_steps=2)
    settings.update(config)
    train(model, tok, rows if rows is not None else _rows(tok, 8), _config(**settings), out_dir=out_dir,
          on_step=on_step)
    return model


class _Stop(Exception):
    pass


def _stop_after(steps):
    def on_step(done):
        if done == steps:
            raise _Stop

    return on_step


@pytest.mark.parametrize("change, named", [
    ({"lr": 3e-2}, "train.lr"),
    ({"objective": ObjectiveConfig(name="dft")}, "objective.name"),
    ({"rows_seed": 9}, "data.digest"),
    ({"model_seed": 5}, "model.weights"),
])
def test_resume_with_other_inputs_is_refused_naming_them(change, named, tiny_tokenizer, tmp_path):
    from onpolicy_sft.rundir import InputsChanged

    with pytest.raises(_Stop):  # a run that saved state at step 1 and died
        _short_run(tiny_tokenizer, tmp_path, on_step=_stop_after(1))
    change = dict(change)
    rows = _rows(tiny_tokenizer, 8, seed=change.pop("rows_seed", 0))
    with pytest.raises(InputsChanged, match=named.replace(".", r"\.")):
        _short_run(tiny_tokenizer, tmp_path, rows=rows, **change)
    assert not (tmp_path / DONE_FILE).exists()


def test_finished_run_is_returned_not_retrained_and_other_inputs_refused(tiny_tokenizer, tmp_path):
    from onpolicy_sft.rundir import InputsChanged

    trained = _short_run(tiny_tokenizer, tmp_path)
    calls = []
    again = _short_run(tiny_tokenizer, tmp_path, on_step=calls.append)
    assert calls == []  # not one step trained again
    for (name, p), q in zip(trained.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name  # the rerun's model holds the finished weights
    with pytest.raises(InputsChanged, match=r"train\.lr"):
        _short_run(tiny_tokenizer, tmp_path, lr=3e-2)
    (tmp_path / "model.safetensors").unlink()  # what the comparison does once a cell's results are in
    retrained = _short_run(tiny_tokenizer, tmp_path, on_step=calls.append)
    assert calls == [1, 2]
    for (name, p), q in zip(trained.named_parameters(), retrained.parameters()):
        assert torch.equal(p, q), name


def test_a_run_killed_before_saving_state_starts_afresh_with_new_inputs(tiny_tokenizer, tmp_path):
    with pytest.raises(_Stop):
        _short_run(tiny_tokenizer, tmp_path, save_every=0, on_step=_stop_after(1))
    _short_run(tiny_tokenizer, tmp_path, lr=3e-2)  # nothing saved to resume, so nothing to refuse
    assert json.loads((tmp_path / "fingerprint.json").read_text())["train.lr"] == 3e-2
    assert _steps_logged(tmp_path) == [1, 2]


def test_second_run_on_a_locked_directory_is_refused(tiny_tokenizer, tmp_path, lock_holder):
    from onpolicy_sft.rundir import DirectoryLocked

    holder = lock_holder(tmp_path, "score")
    with pytest.raises(DirectoryLocked, match=rf"in use by another stage \(score, pid {holder.pid}\)"):
        _short_run(tiny_tokenizer, tmp_path)
    assert not (tmp_path / "logs").exists()


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing_as_finished(tiny_tokenizer, tmp_path):
    from onpolicy_sft.train import NonFiniteTraining
    from safetensors.torch import load_file

    # A finite but absurd rate: step 1's update throws the weights so far that step 2's loss is not finite.
    with pytest.raises(NonFiniteTraining, match=r"training step 2: (loss|gradient norm) .* is not finite"):
        _short_run(tiny_tokenizer, tmp_path, lr=1e30, max_steps=3, save_every=1)
    assert not (tmp_path / DONE_FILE).exists() and not (tmp_path / "model.safetensors").exists()
    assert _steps_logged(tmp_path) == [1]
    saved = load_file(str(tmp_path / "trainer_state" / "step_1" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())  # the last saved state is not NaN


def test_a_damaged_resume_state_is_one_error_naming_the_file_and_the_way_out(tiny_tokenizer, tmp_path):
    from onpolicy_sft.train_state import DamagedFile

    with pytest.raises(_Stop):
        _short_run(tiny_tokenizer, tmp_path, on_step=_stop_after(1))
    weights = tmp_path / "trainer_state" / "step_1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk
    with pytest.raises(DamagedFile, match=rf"{weights} is damaged or cut short .*delete {tmp_path / 'trainer_state'} "
                                          "to train from the start"):
        _short_run(tiny_tokenizer, tmp_path)


def test_row_changes_are_counted_warned_and_recorded(tiny_tokenizer, tmp_path, caplog):
    import datasets

    long_response = " ".join(["seven"] * 40)
    rows = [{"prompt": "p1", "response": "short"}, {"prompt": "p1", "response": "short"},
            {"prompt": "p2", "response": long_response}, {"prompt": "p3 " + "word " * 60, "response": "x"},
            {"prompt": "p4", "response": "fine"}]
    with caplog.at_level("WARNING", logger="onpolicy_sft.train_data"):
        _short_run(tiny_tokenizer, tmp_path, rows=datasets.Dataset.from_list(rows), max_length=32)
    record = json.loads((tmp_path / "train_data.json").read_text())
    assert record["rows"] == 5 and record["kept"] == 4
    assert (record["truncated"], record["skipped_prompt_too_long"], record["duplicates"]) == (1, 1, 1)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "1 truncated" in warning and "1 duplicates" in warning and "1 skipped prompt too long" in warning
    assert json.loads((tmp_path / DONE_FILE).read_text())["rows"]["duplicates"] == 1


def test_pairs_with_a_prompt_filling_max_length_are_skipped_and_counted(tiny_tokenizer):
    import datasets
    from onpolicy_sft.train_data import tokenize_for_training

    pairs = datasets.Dataset.from_list([
        {"prompt": "q", "chosen": "good " * 30, "rejected": "bad"},
        {"prompt": "q " * 60, "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
    ])
    out, counts = tokenize_for_training(pairs, tiny_tokenizer, max_length=32, pairwise=True)
    assert (counts["rows"], counts["kept"], counts["truncated"], counts["skipped_prompt_too_long"]) == (3, 2, 1, 1)
    assert all(len(ids) <= 32 for ids in out["chosen_input_ids"])


@pytest.mark.parametrize("setting, named", [({"epochs": 0.0}, "train.epochs"), ({"max_steps": 0}, "train.max_steps")])
def test_settings_that_would_train_nothing_are_errors(setting, named, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=named.split(".")[1] + ": must be"):
        _short_run(tiny_tokenizer, tmp_path, **{"max_steps": None, **setting})
    assert not (tmp_path / "logs").exists()


def test_target_sft_without_a_teacher_says_it_trains_like_dft(tiny_tokenizer, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="onpolicy_sft.train"):
        _short_run(tiny_tokenizer, tmp_path, objective=ObjectiveConfig(name="target_sft"))
    assert any("same gradient as dft" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def _data_parallel_run(out_dir, on_step=None):
    """Float64, 9 rows in steps of 4: the last step has 1 row for 2 processes. State is saved every step."""
    from tiny import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok, seed=6, dtype=torch.float64)
    train(model, tok, _rows(tok, 9, seed=2), _config(batch_size=4, micro_batch_size=1, warmup_ratio=0.3,
          max_grad_norm=1.0, save_every=1), out_dir=out_dir, on_step=on_step)


TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import builtins, json, os, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    out_dir = os.path.abspath(sys.argv[1])
    writes = []
    if int(os.environ["RANK"]) != 0:  # record every write a non-main process makes under out_dir
        import safetensors.torch, transformers
        real_open = builtins.open

        def watched_open(file, mode="r", *args, **kwargs):
            if any(m in mode for m in "wax+") and os.path.abspath(str(file)).startswith(out_dir):
                writes.append(str(file))
            return real_open(file, mode, *args, **kwargs)

        def watch(owner, name):
            real = getattr(owner, name)
            setattr(owner, name, lambda *a, **k: (writes.append(name), real(*a, **k))[1])

        builtins.open = watched_open
        for owner, name in [(safetensors.torch, "save_file"), (safetensors.torch, "save_model"),
                            (transformers.PreTrainedModel, "save_pretrained")]:
            watch(owner, name)
    from test_train import _data_parallel_run, kill_after
    _data_parallel_run(out_dir, on_step=kill_after(int(sys.argv[3])) if len(sys.argv) > 3 else None)
    if writes:
        builtins.open(sys.argv[2], "w").write(json.dumps(writes))
    """
)


@pytest.mark.slow
def test_two_processes_equal_one_and_only_the_main_process_writes(tmp_path):
    """torchrun, 2 CPU processes over gloo: the same weights as one process (float64), every step
    logged once, and no file written by the second process; killed after step 2 and resumed on 2
    processes, the same weights again."""
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(tests=str(TESTS)))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    writes = tmp_path / "rank1_writes.json"
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(tmp_path / "two"), str(writes)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert not writes.exists(), writes.read_text()
    _data_parallel_run(tmp_path / "one")
    assert _steps_logged(tmp_path / "two") == _steps_logged(tmp_path / "one") == [1, 2, 3]
    logs = [[json.loads(line) for line in (tmp_path / run / "logs" / "train" / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    for key in ("train/loss", "train/tokens", "train/units", "train/grad_norm"):
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], rel=1e-9), key
    assert json.loads((tmp_path / "two" / DONE_FILE).read_text())["processes"] == 2
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-9, atol=1e-12, msg=key)

    killed = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(tmp_path / "again"), str(writes),
                             "2"], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and not (tmp_path / "again" / DONE_FILE).exists()
    assert len(json.loads((tmp_path / "again" / "trainer_state" / "step_2" / "rng.json").read_text())) == 2
    resumed = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(tmp_path / "again"),
                              str(writes)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming training at step 2/3" in resumed.stderr and not writes.exists()
    assert _steps_logged(tmp_path / "again") == [1, 2, 3]
    again = load_file(tmp_path / "again" / "model.safetensors")
    for key in two:
        torch.testing.assert_close(again[key], two[key], rtol=0, atol=0, msg=key)


def test_default_settings_leave_resumable_state(tiny_tokenizer, tmp_path):
    """``train --out`` without a config says "rerun to resume": the default config must save state."""
    from tiny import make_tiny_model

    defaults = TrainConfig(batch_size=1, micro_batch_size=1, trackers=["jsonl"], progress=False)
    steps = defaults.save_every + 1
    with pytest.raises(_Stop):
        train(make_tiny_model(tiny_tokenizer), tiny_tokenizer, _rows(tiny_tokenizer, steps + 1), defaults,
              out_dir=tmp_path, on_step=_stop_after(steps))
    assert json.loads((tmp_path / "trainer_state" / "latest.json").read_text())["step"] == defaults.save_every
