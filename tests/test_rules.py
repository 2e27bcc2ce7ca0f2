"""The shared decoding rules: tail-only text watches against a whole-text decode, on a character
tokenizer and on a byte-level BPE tokenizer whose tokens split characters; the answer markers."""

import random

import numpy as np
import pytest

from decoding import HintedDecodingConfig
from decoding.rules import ANSWER_MARKERS, MarkerTokens, TailWatch, answer_markers, text_contains
from onpolicy_sft.grading import extract_answer
from onpolicy_sft.models import load_tokenizer

STRINGS = [*ANSWER_MARKERS, "漢字", " Q", "\n\n", "é!"]
# Text pieces whose tokens build the strings above across token boundaries, in pieces and whole.
PIECES = ["#", "##", "####", " ", "\\", "\\box", "ed", "boxed", "{", "}", "fbox", "漢", "字", "漢字", "é", "!",
          "Q", " Q", "\n", "\n\n", "a", "7", "🙂", "ü", "x = 3"]


def _pool(tok):
    """Token ids of the pieces, plus the single-byte tokens of multi-byte characters."""
    ids = {t for p in PIECES for t in tok(p, add_special_tokens=False)["input_ids"]}
    ids.add(tok.eos_token_id)
    return sorted(ids)


def _agree(tok, seed, steps=400):
    rng = random.Random(seed)
    pool = _pool(tok)
    for trial in range(40):
        watch, ids = TailWatch(tok, STRINGS), []
        for _ in range(rng.randrange(1, steps // 20)):
            ids.append(rng.choice(pool))
            assert watch.push(ids[-1]) == text_contains(tok, ids, STRINGS), (trial, ids)


def _agree_tokens(tok, seed, streams=40, steps=400):
    """MarkerTokens as the pair mixer runs it, all streams stepped at once, reading the tail only
    where the table is unsure: it must tell what a whole-text decode tells at every token."""
    rng = random.Random(seed)
    pool = _pool(tok)
    watch = MarkerTokens(tok, STRINGS)
    ids = [[] for _ in range(streams)]
    state, found = np.zeros(streams, np.int64), np.zeros(streams, bool)
    reads = 0
    for _ in range(steps // 20):
        tokens = np.array([rng.choice(pool) for _ in range(streams)])
        for out, t in zip(ids, tokens.tolist()):
            out.append(t)
        new = watch.step(state, tokens)
        for i in np.flatnonzero((new == watch.UNSURE) | (len(ids[0]) == 1)).tolist():
            new[i] = watch.read(ids[i][-watch.span :])
            reads += 1
        found |= new == watch.FOUND
        state = np.where(found, 0, np.maximum(new, 0))
        assert found.tolist() == [text_contains(tok, out, STRINGS) for out in ids]
    assert found.any() and not found.all()
    return reads / (streams * (steps // 20))


def test_tail_watch_equals_whole_text_char_tokenizer(tiny_tokenizer):
    _agree(tiny_tokenizer, 0)
    # Every character decodes alike in any context: only the first token of a text is read.
    assert _agree_tokens(tiny_tokenizer, 0) == 1 / 20


@pytest.mark.embedded
def test_tail_watch_equals_whole_text_byte_level_bpe():
    try:
        tok = load_tokenizer("smollm2-135m-instruct")
    except Exception as err:  # the embedded checkpoint is fetched by `onpolicy-sft model fetch`
        pytest.skip(f"embedded tokenizer unavailable: {err}")
    # The byte pieces of a split character decode to U+FFFD alone: the pool must hold such tokens.
    split = [t for t in _pool(tok) if "\ufffd" in tok.decode([t])]
    assert split, "no byte-fallback tokens in the pool: the test would not cover split characters"
    _agree(tok, 1)
    _agree_tokens(tok, 1)
    # A marker written one character per token, right after an emoji split into byte tokens, is
    # seen at the token that completes it.
    ids = [t for ch in "ok 🙂####🙂 4" for t in tok(ch, add_special_tokens=False)["input_ids"]]
    assert len(ids) > len("ok 🙂####🙂 4")
    watch = TailWatch(tok, ["####"])
    hits = [watch.push(t) for t in ids]
    assert hits.index(True) == next(i for i in range(len(ids)) if "####" in tok.decode(ids[: i + 1]))


def test_tail_watch_is_off_without_tokenizer_or_strings(tiny_tokenizer):
    assert not TailWatch(None, ["a"]).push(5)
    assert not TailWatch(tiny_tokenizer, []).active


def test_answer_markers_cover_every_form_the_checker_reads():
    auto = answer_markers(HintedDecodingConfig().answer_marker)
    assert set(auto) == set(ANSWER_MARKERS)
    # Each form the checker extracts an answer from contains one of the guard's markers.
    for text in ["so \\boxed{4}", "\\fbox{4}", "x\n#### 4", "#### 4"]:
        assert extract_answer(text) == "4" and any(m in text for m in auto)
    assert answer_markers("") == ()
    assert set(answer_markers("so")) == set(ANSWER_MARKERS) | {"so"}
    with pytest.raises(TypeError, match="answer_marker"):
        HintedDecodingConfig(answer_marker=None)
