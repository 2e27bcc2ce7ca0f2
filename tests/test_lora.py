"""LoRA through peft: the fused path trains only the adapters, merged = adapted, checkpoints round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from onpolicy_sft.config import PeftConfig, TrainConfig
from onpolicy_sft.encoding import collate
from onpolicy_sft.lora import ADAPTER_DIR, apply_lora, merged_copy, save_lora
from onpolicy_sft.objectives import build
from onpolicy_sft.objectives.adapters import causal_lm_loss
from onpolicy_sft.ops import IGNORE_INDEX
from tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(tokenizer, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(4, len(tokenizer), (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    return collate(rows, tokenizer.pad_token_id)


def _untied(tokenizer, dtype):
    """The tiny model with its own lm_head (LoRA on a tied head would move the embedding when merged)."""
    from transformers import LlamaForCausalLM

    config = make_tiny_model(tokenizer).config
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def _adapted(tokenizer, dtype=torch.float64, **peft):
    targets_head = "lm_head" in peft.get("target_modules", [])
    model = _untied(tokenizer, dtype) if targets_head else make_tiny_model(tokenizer, seed=0, dtype=dtype)
    config = PeftConfig(rank=4, alpha=8.0, **peft)
    adapted = apply_lora(model, config).train()
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA starts with B = 0 (a no-op); give every adapter a nonzero update
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return adapted


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_only_adapters_train_and_loss_falls_on_tiny_overfit_set(tiny_tokenizer):
    # initializer_range 0.1: the default 0.02 gives a frozen tied head too small to fit any row
    model = apply_lora(make_tiny_model(tiny_tokenizer, initializer_range=0.1), PeftConfig(rank=8, alpha=16.0)).train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    objective, batch = build("sft"), _batch(tiny_tokenizer)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = causal_lm_loss(model, objective, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]
    for name, p in model.named_parameters():  # the base weights and the lm_head did not move
        if name in base:
            assert torch.equal(p, base[name]), name


def test_merged_model_logits_equal_adapted_logits(tiny_tokenizer, tmp_path):
    model = _adapted(tiny_tokenizer)
    batch = _batch(tiny_tokenizer, seed=1)
    adapted = _logits(model, batch)
    merged = merged_copy(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, batch), adapted, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_logits(model, batch), adapted, rtol=0, atol=0)  # the copy was merged, not the model

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_lora(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    torch.testing.assert_close(_logits(reloaded, batch), adapted, rtol=1e-10, atol=1e-10)
    fresh = make_tiny_model(tiny_tokenizer, seed=0, dtype=torch.float64)
    with_adapter = PeftModel.from_pretrained(fresh, tmp_path / ADAPTER_DIR)
    torch.testing.assert_close(_logits(with_adapter, batch), adapted, rtol=1e-10, atol=1e-10)


def _grads(model, batch, fused: bool, packed: bool = False):
    objective = build("idft")
    model.zero_grad(set_to_none=True)
    if fused:
        loss, _ = causal_lm_loss(model, objective, batch, packed=packed)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        loss, _ = objective.from_logits(logits, batch["labels"][:, 1:])
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_gradients_equal_full_logits_with_lm_head_targeted_float64(tiny_tokenizer):
    """With the head targeted, the fused path must see the head's adapters (W + ΔW), not W alone."""
    model = _adapted(tiny_tokenizer, target_modules=["q_proj", "v_proj", "lm_head"])
    batch = _batch(tiny_tokenizer, seed=2)
    fused, full = _grads(model, batch, True), _grads(model, batch, False)
    assert any("lm_head" in n for n in fused)
    for name in full:
        torch.testing.assert_close(fused[name], full[name], rtol=1e-9, atol=1e-11, msg=name)
    torch.testing.assert_close(_logits(merged_copy(model), batch), _logits(model, batch), rtol=1e-10, atol=1e-10)


def test_lora_on_a_tied_lm_head_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="tied"):
        apply_lora(make_tiny_model(tiny_tokenizer), PeftConfig(rank=2, target_modules=["q_proj", "lm_head"]))


def test_gradient_checkpointing_and_packing_with_lora_keep_gradients_float64(tiny_tokenizer):
    """Frozen embeddings give the first checkpointed layer inputs without grad; the adapters must
    still get theirs, and the same ones from a packed (padding-free) forward."""
    batch = _batch(tiny_tokenizer, seed=3)
    plain = _grads(_adapted(tiny_tokenizer), batch, True)
    model = _adapted(tiny_tokenizer)
    model.gradient_checkpointing_enable()
    checkpointed = _grads(model, batch, True, packed=True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_config_refuses_bad_peft_settings():
    with pytest.raises(ValueError, match="rank"):
        PeftConfig(rank=-1)
    with pytest.raises(ValueError, match="lm_head"):
        TrainConfig(peft=PeftConfig(rank=4, dropout=0.1, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="fused"):
        TrainConfig(packing=True, fused=False)


def test_unknown_target_module_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="qkv"):
        apply_lora(make_tiny_model(tiny_tokenizer), PeftConfig(rank=2, target_modules=["qkv"]))


def test_train_with_lora_saves_adapter_and_merged_model(tiny_tokenizer, tmp_path):
    import datasets
    from peft import PeftModel

    from onpolicy_sft.config import ObjectiveConfig
    from onpolicy_sft.models import load_model
    from onpolicy_sft.train import train

    rows = []
    for seed in range(4):
        batch = _batch(tiny_tokenizer, n=2, seed=seed)
        rows += [{"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist()}
                 for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
    model = make_tiny_model(tiny_tokenizer, seed=0, dtype=torch.float64, initializer_range=0.1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(objective=ObjectiveConfig(name="sft"), lr=1e-2, batch_size=8, micro_batch_size=4,
                         epochs=6.0, warmup_ratio=0.0, trackers=["jsonl"], progress=False,
                         peft=PeftConfig(rank=4, alpha=8.0))
    train(model, tiny_tokenizer, datasets.Dataset.from_list(rows), config, out_dir=tmp_path)
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "logs" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0]
    assert not any("lora_" in n for n, _ in model.named_parameters())  # the caller's model is merged in place
    assert torch.equal(model.model.embed_tokens.weight, start["model.embed_tokens.weight"])  # frozen head/embeddings
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, start["model.layers.0.self_attn.q_proj.weight"])
    batch = _batch(tiny_tokenizer, seed=9)
    expected = _logits(model, batch)
    saved, _ = load_model(str(tmp_path), dtype=torch.float64, device="cpu")  # as the loop loads each round's model
    torch.testing.assert_close(_logits(saved, batch), expected, rtol=1e-10, atol=1e-10)
    base = make_tiny_model(tiny_tokenizer, seed=0, dtype=torch.float64, initializer_range=0.1)
    adapted = PeftModel.from_pretrained(base, tmp_path / ADAPTER_DIR)
    torch.testing.assert_close(_logits(adapted, batch), expected, rtol=1e-10, atol=1e-10)


def test_lora_run_resumes_from_its_saved_state_float64(tiny_tokenizer, tmp_path):
    """A run stopped after step 3 (state saved at step 2, adapters and frozen weights together)
    resumes and ends with exactly the weights of an uninterrupted run."""
    import datasets
    from safetensors.torch import load_file

    from onpolicy_sft.config import ObjectiveConfig
    from onpolicy_sft.train import train

    rows = []
    for seed in range(5):
        batch = _batch(tiny_tokenizer, n=2, seed=seed)
        rows += [{"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist()}
                 for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
    data = datasets.Dataset.from_list(rows)
    config = TrainConfig(objective=ObjectiveConfig(name="sft"), lr=1e-2, batch_size=2, micro_batch_size=1,
                         warmup_ratio=0.2, trackers=["jsonl"], progress=False, save_every=2,
                         peft=PeftConfig(rank=4, alpha=8.0, dropout=0.1))

    class Stop(Exception):
        pass

    def stop_after_3(done):
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        train(make_tiny_model(tiny_tokenizer, dtype=torch.float64), tiny_tokenizer, data, config,
              out_dir=tmp_path / "resumed", on_step=stop_after_3)
    replayed = []
    train(make_tiny_model(tiny_tokenizer, dtype=torch.float64), tiny_tokenizer, data, config,
          out_dir=tmp_path / "resumed", on_step=replayed.append)
    train(make_tiny_model(tiny_tokenizer, dtype=torch.float64), tiny_tokenizer, data, config,
          out_dir=tmp_path / "straight")
    assert replayed == [3, 4, 5]
    for name in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "resumed" / name), load_file(tmp_path / "straight" / name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
