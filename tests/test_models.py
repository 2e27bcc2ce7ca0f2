"""Loading checkpoints: what a missing or incomplete one says, safetensors only, no remote code; the embedded model."""

import json

import pytest
import torch
from tiny import make_tiny_model
from transformers import AutoModelForCausalLM, GgufConfig

from onpolicy_sft import models


@pytest.mark.parametrize("load", [models.load_model, models.load_tokenizer])
def test_missing_local_model_says_no_such_directory_and_how_to_get_one(tmp_path, monkeypatch, load):
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "no-such-checkpoint"), "./runs/no-such-checkpoint", "runs/a/b"):
        with pytest.raises(models.ModelUnavailableError, match="no such directory.*smollm2-135m-instruct") as e:
            load(path)
        assert "hub" not in str(e.value)
    # a name shaped like a hub id is tried there too (offline in the tests), and the message says both
    with pytest.raises(models.ModelUnavailableError, match="no such directory.*hub"):
        load("no-such-owner/no-such-model")


def test_incomplete_checkpoint_directories_say_what_is_missing(tmp_path, tiny_tokenizer):
    weights_only = tmp_path / "weights-only"
    make_tiny_model(tiny_tokenizer).save_pretrained(weights_only)
    for load in (models.load_model, models.load_tokenizer):
        with pytest.raises(models.ModelUnavailableError, match="no tokenizer files") as e:
            load(str(weights_only))
        assert "sentencepiece" not in str(e.value)
    tokenizer_only = tmp_path / "tokenizer-only"
    tiny_tokenizer.save_pretrained(tokenizer_only)
    assert models.load_tokenizer(str(tokenizer_only)).encode("4") == tiny_tokenizer.encode("4")
    with pytest.raises(models.ModelUnavailableError, match="no config.json"):
        models.load_model(str(tokenizer_only))
    with pytest.raises(models.ModelUnavailableError, match="a file, not a checkpoint directory"):
        models.load_model(str(weights_only / "model.safetensors"))


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_tokenizer):
    """Weights load from safetensors only: a pytorch_model.bin checkpoint is not unpickled."""
    model = make_tiny_model(tiny_tokenizer)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(models.ModelUnavailableError):
        models.load_model(str(tmp_path), device="cpu")


def test_remote_code_is_off_by_default(tmp_path, tiny_tokenizer):
    make_tiny_model(tiny_tokenizer).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    model, _ = models.load_model(str(tmp_path), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_local_checkpoint_round_trip_and_hidden_states(tmp_path, tiny_tokenizer, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = models.load_model(str(tmp_path), device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tokenizer("2 + 2 = 4")["input_ids"]])
    expected = tiny_model(ids).logits
    hidden = models.decoder_hidden_states(model, ids)
    assert torch.allclose(hidden @ models.lm_head_weight(model).T, expected, atol=1e-5)


def test_default_dtype_is_float32_on_cpu():
    assert models.default_dtype("cpu") == torch.float32
    assert models.default_dtype("cuda") == torch.bfloat16


@pytest.mark.embedded
@pytest.mark.slow
def test_converted_checkpoint_reproduces_gguf_logits(embedded):
    model, tokenizer = embedded
    gguf = models.embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    ).eval()
    ids = torch.tensor([tokenizer("The capital of France is Paris. Twelve plus thirty is")["input_ids"]])
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert ours.shape[-1] == 49152
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    assert theirs[0, -1].argmax() == ours[0, -1].argmax()


# Recorded once from the converted checkpoint (float32, CPU; the same with 1 and 2 threads).
GREEDY_IDS = [39, 1232, 216, 37, 446, 216, 33, 34, 198, 198, 504, 2988, 314, 3814, 4810, 277, 6150, 30, 2]
GREEDY_TEXT = "7 + 5 = 12\n\nThe answer is \\boxed{}."
CONTINUATION_LOGP = -12.2493  # "The answer is \\boxed{12}." after the same prompt, summed over its tokens


@pytest.mark.embedded
def test_embedded_model_answers_offline(embedded):
    """The converted weights behave as recorded: the same greedy answer token for token, ending with
    the end-of-turn token, and the same log-probability of a fixed continuation."""
    model, tokenizer = embedded
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 7 + 5? Put the final answer in \\boxed{}."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    n = prompt["input_ids"].shape[1]
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    assert out[0, n:].tolist() == GREEDY_IDS
    assert tokenizer.decode(out[0, n:], skip_special_tokens=True) == GREEDY_TEXT
    assert GREEDY_IDS[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    continuation = tokenizer("The answer is \\boxed{12}.", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt["input_ids"][0], torch.tensor(continuation)])[None]
    with torch.no_grad():
        logp = model(ids).logits[0, n - 1 : -1].log_softmax(-1)
    assert logp.gather(-1, ids[0, n:, None]).sum().item() == pytest.approx(CONTINUATION_LOGP, abs=1e-3)
