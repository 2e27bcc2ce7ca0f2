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

# Every form in which a response states its final answer, as the answer checker reads them
# (onpolicy_sft.grading): the answer guard watches for these, so whatever is graded was written by
# the student stream alone.
ANSWER_MARKERS = ("\\boxed", "\\fbox", "####")


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

    "auto" is every final-answer form the checker reads (ANSWER_MARKERS), so whatever is graded
    was written by the student stream alone; "" turns the guard off; any other string is watched
    for in addition to those forms (never instead of them).
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
    """The answer guard on token ids, for many streams at once: an automaton over the markers'
    characters whose every token step is looked up in a table, so that a stream's text is decoded
    only where a token's text depends on its neighbours.

    A stream's state is the longest end of its text that begins one of `strings`; FOUND once a
    string has appeared. `table[state, token]` is the state after the token's text, each token's
    text read as it decodes after a left context. A token whose text differs after two different
    contexts, or holds a piece of a split character (U+FFFD), is UNSURE: then `read` decodes the
    stream's last `span` tokens (as TailWatch does at every token) and restarts the automaton on that
    text. The first token of a text is always read so (a decoder may strip a leading space there).
    """

    FOUND, UNSURE = -1, -2

    def __init__(self, tokenizer, strings):
        self.tokenizer = tokenizer
        self.strings = tuple(s for s in strings if s)
        self.span = max((len(s.encode()) for s in self.strings), default=0) + 1
        self.states = sorted({s[:k] for s in self.strings for k in range(len(s))}, key=len)
        self._index = {text: i for i, text in enumerate(self.states)}
        self._moves: dict[tuple[int, str], int] = {}
        ids = list(range(len(tokenizer)))
        texts = []
        for word in ("a", "\n"):
            context = tokenizer.encode(word, add_special_tokens=False)[-1:]
            head = tokenizer.decode(context, skip_special_tokens=False)
            full = tokenizer.batch_decode([context + [t] for t in ids], skip_special_tokens=False)
            texts.append([f[len(head):] if f.startswith(head) else None for f in full])
        sure = [a if a is not None and a == b and "\ufffd" not in a else None for a, b in zip(*texts)]
        root = np.array([self.UNSURE if a is None else self.run(0, a) for a in sure], np.int64)
        self.table = np.tile(root, (len(self.states), 1))
        for t, a in enumerate(sure):
            if a == "":  # a token with no text leaves every state as it is
                self.table[:, t] = np.arange(len(self.states))
        # From another state a token's run differs from the root's only if its first character moves
        # the two apart; after that character both runs are in the same state.
        for state in range(1, len(self.states)):
            apart = {a[0] for a in sure if a and self.run(state, a[0]) != self.run(0, a[0])}
            for t, a in enumerate(sure):
                if a and a[0] in apart:
                    self.table[state, t] = self.run(state, a)

    def run(self, state: int, text: str) -> int:
        """The state after `text` from `state`."""
        for ch in text:
            move = self._moves.get((state, ch))
            if move is None:
                grown = self.states[state] + ch
                if any(grown.endswith(s) for s in self.strings):
                    move = self.FOUND
                else:  # the longest end of the grown text that still begins a string
                    move = next(self._index[grown[k:]] for k in range(len(grown) + 1) if grown[k:] in self._index)
                self._moves[(state, ch)] = move
            if move == self.FOUND:
                return move
            state = move
        return state

    def step(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """The next state of each stream (FOUND, UNSURE, or a state), for all streams at once."""
        inside = tokens < self.table.shape[1]
        return np.where(inside, self.table[states, np.where(inside, tokens, 0)], self.UNSURE)

    def read(self, tail: list[int]) -> int:
        """The state after decoding `tail`, a stream's last `span` tokens."""
        return self.run(0, self.tokenizer.decode(tail, skip_special_tokens=False))


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
