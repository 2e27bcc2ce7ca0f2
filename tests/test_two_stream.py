"""Two-stream Hinted Decoding and plain sampling: the hf backend against the reference loop,
and the rules of docs/methods.md §5 on a scripted model whose logits we choose."""

from types import SimpleNamespace

import pytest
import torch

from decoding import HintedDecodingConfig, SamplingConfig, make_backend, mix_logprobs, two_stream_generate
from decoding.hf import hf_sample, hf_two_stream
from decoding.reference import reference_sample, reference_two_stream
from decoding.rules import ANSWER_MARKERS
from onpolicy_sft import arith
from onpolicy_sft.grading import extract_answer

PROMPTS = [
    ("Hint: the answer is 42 because 6*7. Question: what is 6*7?", "Question: what is 6*7?"),
    ("hi", "q"),
    ("Rewrite the solution in your own words: 3+4=7", "What is 3+4?"),
    ("A", "Some much longer student prompt than its hinted partner"),
    ("Hint: x", "Q: y"),
]


def _ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


@pytest.fixture
def pairs(tiny_tokenizer):
    return _ids(tiny_tokenizer, [h for h, _ in PROMPTS]), _ids(tiny_tokenizer, [s for _, s in PROMPTS])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_hf_equals_reference_loop(tiny_model, tiny_tokenizer, pairs, temperature):
    hinted, student = pairs
    cfg = HintedDecodingConfig(temperature=temperature, max_new_tokens=24, batch_size=3, top_p=0.9)
    got = hf_two_stream(tiny_model, hinted, student, cfg, tiny_tokenizer)
    assert got == reference_two_stream(tiny_model, hinted, student, cfg, tiny_tokenizer)
    assert all(0 < len(g) <= 24 for g in got)


def test_batch_with_different_lengths_equals_one_by_one(tiny_model, tiny_tokenizer, pairs):
    hinted, student = pairs
    cfg = HintedDecodingConfig(temperature=1.0, top_p=0.95, max_new_tokens=30, batch_size=5, seed=11)
    together = hf_two_stream(tiny_model, hinted, student, cfg, tiny_tokenizer)
    one = HintedDecodingConfig(**{**cfg.__dict__, "batch_size": 1})
    assert together == hf_two_stream(tiny_model, hinted, student, one, tiny_tokenizer)
    # A different seed gives different samples: the equality above is not vacuous.
    other = HintedDecodingConfig(**{**cfg.__dict__, "seed": 12})
    assert together != hf_two_stream(tiny_model, hinted, student, other, tiny_tokenizer)


def test_greedy_is_argmax_of_mixture_and_deterministic(tiny_model, tiny_tokenizer, pairs):
    hinted, student = pairs
    cfg = HintedDecodingConfig(temperature=0.0, max_new_tokens=10, top_p=0.01, seed=0, answer_marker="")
    got = two_stream_generate(tiny_model, hinted, student, cfg, tiny_tokenizer)
    for h, s, out in zip(hinted, student, got):
        for k, token in enumerate(out):
            with torch.no_grad():
                logits_h = tiny_model(torch.tensor([h + out[:k]])).logits[:, -1].double()
                logits_s = tiny_model(torch.tensor([s + out[:k]])).logits[:, -1].double()
            # The first token comes from the hinted stream alone (first_from_hinted).
            mixed = torch.log_softmax(logits_h, -1) if k == 0 else mix_logprobs(logits_h, logits_s, cfg.beta)[0]
            assert token == mixed.argmax(-1).item()
    other = HintedDecodingConfig(**{**cfg.__dict__, "top_p": 1.0, "seed": 5})
    assert got == two_stream_generate(tiny_model, hinted, student, other)  # top-p and seed do not matter at τ = 0


def test_unpaired_or_empty_prompts_are_refused(tiny_model, pairs):
    hinted, student = pairs
    cfg = HintedDecodingConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="2 hinted prompts but 1 student"):
        two_stream_generate(tiny_model, hinted[:2], student[:1], cfg)
    with pytest.raises(ValueError, match="student prompt 0 is empty"):
        two_stream_generate(tiny_model, hinted[:1], [[]], cfg)


def test_unknown_backends_and_an_empty_nucleus_are_refused(tiny_model):
    with pytest.raises(ValueError, match="backend"):
        HintedDecodingConfig(backend="tgi")
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="unknown decoding backend"):
        make_backend("tgi", tiny_model)
    with pytest.raises(TypeError, match="in memory"):
        make_backend("hf", "smollm2-135m-instruct")


# ---- plain sampling --------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_sample_equals_reference(tiny_model, tiny_tokenizer, pairs, temperature):
    _, prompts = pairs
    cfg = SamplingConfig(n=3, temperature=temperature, top_p=0.9, max_new_tokens=12, seed=4)
    got = make_backend("hf", tiny_model, tiny_tokenizer, batch_rows=4).sample(prompts, cfg)
    assert got == reference_sample(tiny_model, prompts, cfg, tiny_tokenizer)
    assert [len(c) for c in got] == [3] * len(prompts)
    if temperature > 0:
        assert got[0][0] != got[0][1]


# ---- a scripted model ------------------------------------------------------------------

class ScriptedLM(torch.nn.Module):
    """A fake causal LM: the next-token logits are a function `script(context)` of the full
    token context of the row. Its "KV cache" is simply every row's context so far, so it
    serves the cached backend and the uncached reference loop alike."""

    def __init__(self, script, vocab: int, eos: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab = script, vocab
        self.config = SimpleNamespace(eos_token_id=eos, pad_token_id=None)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, **_):
        contexts = past_key_values or [[] for _ in range(input_ids.shape[0])]
        width = input_ids.shape[1]
        for row, ids in enumerate(input_ids.tolist()):
            keep = attention_mask[row, -width:].tolist() if attention_mask is not None else [1] * width
            contexts[row] = contexts[row] + [t for t, k in zip(ids, keep) if k]
        logits = torch.stack([self.script(c) for c in contexts]).unsqueeze(1)
        return SimpleNamespace(logits=logits.expand(-1, width, -1), past_key_values=contexts)


def _scripted(tok, hinted_text, student_text, hinted_flat=False):
    """Hinted prompts start with 'H', student prompts with 'S'; each stream greedily writes its
    text (continuing from however much of the generated text matches), then eos. A flat hinted
    stream puts a faint preference on its next character over a near-uniform distribution."""
    start, eos = tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id
    vocab = len(tok)

    def script(context):
        prompt_end = context.index(start)
        generated = tok.decode(context[prompt_end + 1 :])
        hinted = tok.decode(context[:1]) == "H"
        text = hinted_text if hinted else student_text
        logits = torch.zeros(vocab)
        nxt = eos
        # continue the script after the longest prefix of the generated text that it explains
        for k in range(len(generated), -1, -1):
            if text.startswith(generated[len(generated) - k :]):
                nxt = tok.convert_tokens_to_ids(text[k]) if k < len(text) else eos
                break
        logits[nxt] = 0.01 if (hinted and hinted_flat) else 20.0
        return logits

    prompts = lambda first: [tok(first + "x")["input_ids"] + [start]]
    return ScriptedLM(script, vocab, eos), prompts("H"), prompts("S")


BOTH = [hf_two_stream, reference_two_stream]


@pytest.mark.parametrize("run", BOTH)
def test_answer_guard_switches_to_student(tiny_tokenizer, run):
    tok = tiny_tokenizer
    model, hinted, student = _scripted(tok, "so \\boxed{42}", "so \\boxed{7}")
    cfg = HintedDecodingConfig(beta=0.0, temperature=0.0, max_new_tokens=40)
    guarded = run(model, hinted, student, cfg, tok)[0]
    assert tok.decode(guarded) == "so \\boxed{7}<|im_end|>"
    unguarded = run(model, hinted, student, cfg, None)[0]  # no tokenizer: the guard is off
    assert tok.decode(unguarded) == "so \\boxed{42}<|im_end|>"
    custom = run(model, hinted, student, HintedDecodingConfig(**{**cfg.__dict__, "answer_marker": "so"}), tok)[0]
    assert tok.decode(custom).startswith("so \\boxed{7}")


@pytest.mark.parametrize("run", BOTH)
def test_first_token_from_hinted_stream(tiny_tokenizer, run):
    tok = tiny_tokenizer
    # The hinted stream is nearly flat (λ = 1 with β = 3), so the student leads except at step 0.
    model, hinted, student = _scripted(tok, "aaaa", "bbbb", hinted_flat=True)
    cfg = HintedDecodingConfig(temperature=0.0, max_new_tokens=4, top_p=1.0)
    assert tok.decode(run(model, hinted, student, cfg, tok)[0]) == "abbb"
    off = HintedDecodingConfig(**{**cfg.__dict__, "first_from_hinted": False})
    assert tok.decode(run(model, hinted, student, off, tok)[0]) == "bbbb"


@pytest.mark.parametrize("run", BOTH)
def test_a_window_repeated_repeat_count_times_stops_generation(tiny_tokenizer, run):
    tok = tiny_tokenizer
    cycle = "abc" * 100
    model, hinted, student = _scripted(tok, cycle, cycle)
    cfg = HintedDecodingConfig(temperature=0.0, max_new_tokens=200, repeat_window=6, repeat_count=4)
    out = run(model, hinted, student, cfg, tok)[0]
    # The 6-token window "abcabc" occurs at offsets 0, 3, 6, 9: its 4th occurrence ends at token 15.
    assert tok.decode(out) == cycle[:15]


@pytest.mark.parametrize("run", BOTH)
def test_eos_ends_only_its_own_row(tiny_tokenizer, run):
    tok = tiny_tokenizer
    model, hinted, student = _scripted(tok, "ab", "ab")
    start = tok.convert_tokens_to_ids("<|im_start|>")
    long_hinted = [tok("Hxyz")["input_ids"] + [start]]
    long_student = [tok("Sxyzw")["input_ids"] + [start]]
    cfg = HintedDecodingConfig(beta=0.0, temperature=0.0, max_new_tokens=10)
    out = run(model, hinted + long_hinted, student + long_student, cfg, tok)
    assert [tok.decode(o) for o in out] == ["ab<|im_end|>", "ab<|im_end|>"]
    assert out[0][-1] == tok.eos_token_id
    capped = run(model, hinted, student, HintedDecodingConfig(**{**cfg.__dict__, "max_new_tokens": 1}), tok)
    assert tok.decode(capped[0]) == "a"


def test_sampling_ends_at_a_stop_string_which_needs_a_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    model, _, student = _scripted(tok, "", "hello world. more")
    cfg = SamplingConfig(n=2, temperature=0.0, max_new_tokens=30, stop=["."])
    got = hf_sample(model, student, cfg, tok)
    assert [tok.decode(c) for c in got[0]] == ["hello world."] * 2
    assert reference_sample(model, student, cfg, tok) == got
    with pytest.raises(ValueError, match="need a tokenizer"):
        hf_sample(model, student, cfg, None)


@pytest.mark.parametrize("form", ["hashes", "boxed"])
def test_no_answer_is_written_while_the_hinted_stream_leads(tiny_tokenizer, form):
    """On the built-in data, a hinted stream that copies the reference solution reaches its final
    answer marker; from the token that completes it on, every token is the student's (λ = 1), so the
    answer the checker reads is the student's own, and the copied one is never graded."""
    tok = tiny_tokenizer
    for problem in arith.generate(0, 4):
        solution = problem.response if form == "hashes" else problem.response.replace("#### ", "so \\boxed{") + "}"
        wrong = problem.answer + 1
        model, hinted, student = _scripted(tok, solution, f"#### {wrong}" if form == "hashes" else f"\\boxed{{{wrong}}}")
        cfg = HintedDecodingConfig(beta=0.0, temperature=0.0, max_new_tokens=80)
        lams: list[list[float]] = []
        want = reference_two_stream(model, hinted, student, cfg, tok, lambdas=lams)
        assert hf_two_stream(model, hinted, student, cfg, tok) == want
        text = tok.decode(want[0], skip_special_tokens=True)
        ends = [k for k in range(1, len(want[0]) + 1)
                if any(m in tok.decode(want[0][:k]) for m in ANSWER_MARKERS)]
        assert ends, text
        assert all(lam == 0.0 for lam in lams[0][: ends[0]]) and all(lam == 1.0 for lam in lams[0][ends[0]:])
        assert extract_answer(text) == str(wrong), text
        # Without the guard the hinted stream writes the reference answer itself: the false positive.
        off = HintedDecodingConfig(**{**cfg.__dict__, "answer_marker": ""})
        copied = tok.decode(reference_two_stream(model, hinted, student, off, tok)[0], skip_special_tokens=True)
        assert extract_answer(copied) == str(problem.answer)


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_greedy_hf_equals_reference(embedded):
    from onpolicy_sft.hint_template import HintTemplate, hinted_prompt_ids, student_prompt_ids

    model, tok = embedded
    questions = [("What is 12+30?", "12+30=42\n#### 42"), ("Tom has 5 apples and eats 2. How many are left?", "5-2=3\n#### 3")]
    hinted = [hinted_prompt_ids(tok, HintTemplate(), q, s) for q, s in questions]
    student = [student_prompt_ids(tok, q) for q, _ in questions]
    cfg = HintedDecodingConfig(temperature=0.0, max_new_tokens=16, batch_size=2)
    got = hf_two_stream(model, hinted, student, cfg, tok)
    assert got == reference_two_stream(model, hinted, student, cfg, tok)
    assert all(len(g) > 0 for g in got)
