"""The decoding rules every backend shares: end-of-sequence ids, stop strings, the answer guard,
the repetition stop and the λ that the rules of docs/methods.md §5 force.

Each rule looks at a bounded tail of what was generated, so its cost per token does not grow with
the length of the response. `text_contains` is the whole-text oracle the tail rules are tested
against (and that the one-prompt-at-a-time reference loops use).
"""

from __future__ import annotations

import math
from collections import Counter, deque

import numpy as np

from onpolicy_sft.grading import ANSWER_MARKERS


def eos_ids(model, tokenizer=None) -> set[int]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def answer_markers(answer_marker: str) -> tuple[str, ...]:
    """The strings the answer guard watches for, from HintedDecodingConfig.answer_marker.

    "auto" is every final-answer form the checker reads (onpolicy_sft.grading.ANSWER_MARKERS), so
    whatever is graded was written by the student stream alone; "" turns the guard off; any other
    string is watched for in addition to those forms (never instead of them).
    """
    if answer_marker == "":
        return ()
    if answer_marker == "auto":
        return tuple(ANSWER_MARKERS)
    return tuple(dict.fromkeys((*ANSWER_MARKERS, answer_marker)))


def text_contains(tokenizer, ids: list[int], strings) -> bool:
    """Whether the decoded text of `ids` contains one of `strings` (decodes the whole text)."""
    if not strings or tokenizer is None or not ids:
        return False
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return any(s in text for s in strings)


class TailWatch:
    """Tells, token by token, whether the decoded text so far contains one of `strings`.

    Each push decodes only the last few tokens: a string of b UTF-8 bytes that first appears with
    the newest token lies within the last b tokens (every token that carries part of it carries at
    least one of its bytes). One more token of left context keeps the tokenizer's start-of-text
    rules (a stripped leading space, an orphan continuation byte of a split character) outside the
    string; UTF-8 resynchronises at the string's first byte. Once found, it stays found.
    """

    def __init__(self, tokenizer, strings):
        self.tokenizer = tokenizer
        self.strings = tuple(s for s in strings if s) if tokenizer is not None else ()
        span = max((len(s.encode()) for s in self.strings), default=0) + 1
        self.tail: deque[int] = deque(maxlen=span)
        self.found = False

    @property
    def active(self) -> bool:
        return bool(self.strings)

    def push(self, token: int) -> bool:
        if self.found or not self.strings:
            return self.found
        self.tail.append(token)
        text = self.tokenizer.decode(list(self.tail), skip_special_tokens=False)
        self.found = any(s in text for s in self.strings)
        return self.found


class MarkerTokens:
    """The answer guard on token ids, for many streams at once: which tokens can complete one of
    `strings`, so that a stream's text is decoded only at those tokens.

    A string that first appears with the newest token ends inside that token's text, so the token's
    text either contains the string or starts with one of its proper suffixes (the rest sits at the
    end of the text before). Each token's text is read as it decodes after two different left
    contexts; a token whose text depends on its neighbours (a piece of a split character, a leading
    space a decoder strips) or that the two contexts read differently counts as completing, and so
    does every id past the tokenizer's vocabulary. At such a token, `found_in` decodes the last `span`
    tokens, as TailWatch does at every token.
    """

    def __init__(self, tokenizer, strings):
        self.tokenizer = tokenizer
        self.strings = tuple(s for s in strings if s)
        self.span = max((len(s.encode()) for s in self.strings), default=0) + 1
        suffixes = tuple({s[j:] for s in self.strings for j in range(1, len(s))})
        ids = list(range(len(tokenizer)))
        texts = []
        for word in ("a", "\n"):
            context = tokenizer.encode(word, add_special_tokens=False)[-1:]
            head = tokenizer.decode(context, skip_special_tokens=False)
            full = tokenizer.batch_decode([context + [t] for t in ids], skip_special_tokens=False)
            texts.append([f[len(head):] if f.startswith(head) else None for f in full])
        self.completes = np.array([
            a is None or a != b or "\ufffd" in a or (bool(suffixes) and a.startswith(suffixes))
            or any(s in a for s in self.strings)
            for a, b in zip(*texts)
        ], dtype=bool)

    def can_complete(self, tokens: np.ndarray) -> np.ndarray:
        """Per token id, whether it may complete a string (True for ids past the vocabulary)."""
        inside = tokens < len(self.completes)
        return ~inside | self.completes[np.where(inside, tokens, 0)]

    def found_in(self, tail: list[int]) -> bool:
        """Whether a string ends in the decoded text of `tail`, a stream's last `span` tokens."""
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in self.strings)


class RepetitionStop:
    """Degenerate-repetition stop: some `window`-token window has occurred `count` times.

    Windows are counted incrementally as tokens arrive; only the newest window can reach the
    count, so one Counter lookup per token gives the same answer as rescanning.
    """

    def __init__(self, window: int, count: int):
        self.window, self.count = window, count
        self.seen: Counter = Counter()
        self.tail: deque[int] = deque(maxlen=window)

    def push(self, token: int) -> bool:
        self.tail.append(token)
        if len(self.tail) < self.window:
            return False
        key = tuple(self.tail)
        self.seen[key] += 1
        return self.seen[key] >= self.count


def repetition_length(ids: list[int], window: int, count: int) -> int | None:
    """The first length at which `ids` trips the repetition stop, or None."""
    stop = RepetitionStop(window, count)
    for i, token in enumerate(ids):
        if stop.push(token):
            return i + 1
    return None


def forced_lambda(step: int, guard_tripped: bool, first_from_hinted: bool) -> float:
    """λ forced by the rules of docs/methods.md §5: 1 (student alone) once the text holds a final
    answer marker, 0 (hinted alone) for the first token, else NaN (the entropy rule decides)."""
    if guard_tripped:
        return 1.0
    if step == 0 and first_from_hinted:
        return 0.0
    return math.nan
