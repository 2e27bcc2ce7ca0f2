"""Padding-free packing and gradient checkpointing: the same hidden states, loss and gradients as padded."""

from __future__ import annotations

import pytest
import torch

from onpolicy_sft.encoding import collate
from onpolicy_sft.models import decoder_hidden_states
from onpolicy_sft.objectives import build
from onpolicy_sft.objectives.adapters import causal_lm_loss
from onpolicy_sft.ops import IGNORE_INDEX
from onpolicy_sft.packing import pack, packed_hidden_states, unpack
from tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n, seed=0, vocab=90):
    """Rows of different lengths, response labels on the second half of each row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 17, (1,), generator=g))
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _model(tokenizer, attn="sdpa", seed=0):
    model = make_tiny_model(tokenizer, seed=seed, dtype=torch.float64, attn_implementation=attn)
    return model.train()


def test_pack_unpack_round_trip_and_positions_restart():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [0, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]])
    packed, positions, index = pack(ids, mask)
    assert packed.tolist() == [[5, 6, 7, 8, 9, 3, 4, 5]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    back = unpack(packed[0].unsqueeze(-1).double(), index, tuple(ids.shape)).squeeze(-1)
    assert torch.equal(back.long(), ids * mask)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_rows_do_not_attend_across_rows(tiny_tokenizer, attn, side):
    """Each packed row's hidden states equal those of the row run alone (so no cross-row attention)."""
    tol = 1e-10 if attn == "sdpa" else 1e-5  # eager takes its softmax in float32 even for float64 inputs
    model = _model(tiny_tokenizer, attn).eval()
    rows = _rows(5, seed=1)
    batch = collate(rows, tiny_tokenizer.pad_token_id, padding_side=side)
    with torch.no_grad():
        packed = packed_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        for i, row in enumerate(rows):
            alone = decoder_hidden_states(model, torch.tensor([row["input_ids"]]))[0]
            real = batch["attention_mask"][i].bool()
            torch.testing.assert_close(packed[i][real], alone, rtol=tol, atol=tol)
            assert not packed[i][~real].any()
        # a negative control: the same tokens as one unbroken sequence do see the earlier rows
        ids, _, index = pack(batch["input_ids"], batch["attention_mask"])
        unbroken = unpack(decoder_hidden_states(model, ids)[0], index, tuple(batch["input_ids"].shape))
    assert not torch.allclose(unbroken[1][batch["attention_mask"][1].bool()], packed[1][batch["attention_mask"][1].bool()])


def _loss_and_grads(model, objective, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss, metrics = causal_lm_loss(model, objective, batch, **kw)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol=1e-10):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        assert metrics_a[key] == pytest.approx(metrics_b[key], rel=tol, abs=tol), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("objective_name", ["sft", "idft", "target_sft"])
def test_packed_loss_and_gradients_equal_padded_float64(tiny_tokenizer, objective_name):
    model = _model(tiny_tokenizer)
    teacher = _model(tiny_tokenizer, seed=1).eval().requires_grad_(False) if objective_name == "target_sft" else None
    objective = build(objective_name)
    batch = collate(_rows(6, seed=2), tiny_tokenizer.pad_token_id)
    padded = _loss_and_grads(model, objective, batch, teacher=teacher, progress=0.3)
    packed = _loss_and_grads(model, objective, batch, teacher=teacher, progress=0.3, packed=True)
    _assert_same(padded, packed)


def test_packed_dpo_with_reference_model_equals_padded_float64(tiny_tokenizer):
    """DPO needs per-row sums: the packed forward must give each row's tokens back to that row."""
    model = _model(tiny_tokenizer)
    ref = _model(tiny_tokenizer, seed=3).eval().requires_grad_(False)
    objective = build("dpo", beta=0.5)
    batch = collate(_rows(8, seed=4), tiny_tokenizer.pad_token_id)  # 4 chosen rows, then 4 rejected
    padded = _loss_and_grads(model, objective, batch, ref=ref)
    packed = _loss_and_grads(model, objective, batch, ref=ref, packed=True)
    _assert_same(padded, packed)


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_checkpointing_keeps_fused_gradients_float64(tiny_tokenizer, packed):
    """The fused loss reads hidden states from the decoder body; recomputing the layers in backward
    must give the same gradients as keeping their activations."""
    objective = build("idft")
    batch = collate(_rows(6, seed=5), tiny_tokenizer.pad_token_id)
    plain = _loss_and_grads(_model(tiny_tokenizer), objective, batch, packed=packed)
    model = _model(tiny_tokenizer)
    model.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed = _loss_and_grads(model, objective, batch, packed=packed)
    _assert_same(plain, checkpointed)


def test_train_with_packing_ends_with_the_padded_run_weights_float64(tiny_tokenizer, tmp_path):
    import datasets

    from onpolicy_sft.config import ObjectiveConfig, TrainConfig
    from onpolicy_sft.train import train

    data = datasets.Dataset.from_list(_rows(12, seed=6))
    weights = {}
    for packing in (False, True):
        model = _model(tiny_tokenizer)
        config = TrainConfig(objective=ObjectiveConfig(name="idft"), lr=1e-2, batch_size=6, micro_batch_size=3,
                             warmup_ratio=0.0, trackers=["jsonl"], progress=False, packing=packing,
                             group_by_length=False)
        train(model, tiny_tokenizer, data, config, out_dir=tmp_path / str(packing))
        weights[packing] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-9, atol=1e-11, msg=name)
    assert not torch.equal(weights[False]["model.norm.weight"], _model(tiny_tokenizer).model.norm.weight)
