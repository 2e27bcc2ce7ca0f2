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
from onpolicy_sft.train import DONE_FILE, ObjectiveModel, plan_steps, step_gradients, train

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(tokenizer, n, seed=0):
    """Tokenized rows with different prompt and response lengths (so micro-batches differ in size)."""
    from onpolicy_sft.data import encode_example

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
    from onpolicy_sft.data import collate
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
    from onpolicy_sft.data import collate
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
    results = []
    for micro in (8, 2):
        model = make_tiny_model(tiny_tokenizer, seed=2, dtype=torch.float64)
        train(model, tiny_tokenizer, ds, _config(micro_batch_size=micro, max_grad_norm=1.0, warmup_ratio=0.5),
              out_dir=tmp_path / f"m{micro}")
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-9, atol=1e-12, msg=name)


def test_checkpoint_round_trip_and_jsonl_log(tiny_tokenizer, tmp_path):
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
    "sft": {}, "dft": {}, "power": {"alpha": 0.5}, "eaft": {}, "threshold": {"tau": 0.0}, "label_smoothing": {"epsilon": 0.1},
    "sft_kl": {"lam": 0.1}, "asft": {"lam": 0.1}, "distill": {}, "hybrid_distill": {"lam": 0.5},
    "target_sft": {"eta": 0.5}, "idft": {}, "dpo": {"beta": 0.1}, "simpo": {},
}


def _data_nll(model, tokenizer, ds) -> float:
    from onpolicy_sft.data import collate

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


def _resume_run(out_dir, kill_after_step: int | None = None):
    """The run the resume test kills and repeats: 5 steps, state saved every 2, warmup and clipping on."""
    from tiny import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok, seed=4)
    train(model, tok, _rows(tok, 20), _config(batch_size=4, micro_batch_size=2, lr=1e-2, warmup_ratio=0.2,
          max_grad_norm=1.0, save_every=2), out_dir=out_dir,
          on_step=kill_after(kill_after_step) if kill_after_step else None)


KILLED_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_train import _resume_run
    _resume_run(sys.argv[1], kill_after_step=int(sys.argv[2]))
    """
)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    """SIGKILL after step 3 of 5 (state saved at step 2) in a child process; resuming here replays
    step 3 and must end with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(KILLED_SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "resumed"), "3"], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((tmp_path / "resumed" / "trainer_state" / "latest.json").read_text())["step"] == 2
    assert not (tmp_path / "resumed" / DONE_FILE).exists()
    for out in ("resumed", "straight"):
        _resume_run(tmp_path / out)
    a = load_file(tmp_path / "resumed" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
