"""Hinted Decoding inside an inference engine's batch: the pair logic, with no engine in it.

Each (hinted, student) pair is two requests of one engine batch. Every step the engine hands a
batch-level logits processor the logits of all its rows; `PairBook.apply` finds the two rows of
each pair, mixes them (decoding.mixing.hinted_step), draws one token per pair and masks both rows
to it, so that a greedy engine sampler emits that token for both streams. The engine-facing
adapters (decoding.vllm_mixer) only translate the engine's batch updates into `PairBook.update`.

Token values come only from the book's own record of what each pair chose: with asynchronous
scheduling the engine's output lists hold placeholders for the token in flight, so they are read
for their lengths alone.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass

import torch

from .mixing import generators_for, hinted_step
from .rules import RepetitionStop, TailWatch, forced_lambda

KEY = "onpolicy_hd"  # the SamplingParams.extra_args entry that carries a request's pair spec
ROLES = ("hinted", "student")
_FIELDS = {"pair": str, "role": str, "seed": int, "beta": float, "top_p": float, "temperature": float,
           "markers": list, "first": bool, "window": int, "count": int, "eos": int}


def pair_spec(pair: str, role: str, *, seed: int, config, markers, eos: int) -> dict:
    """The plain dict a request carries (it must survive the engine's serialisation)."""
    return dict(pair=pair, role=role, seed=int(seed), beta=float(config.beta), top_p=float(config.top_p),
                temperature=float(config.temperature), markers=list(markers), first=bool(config.first_from_hinted),
                window=int(config.repeat_window), count=int(config.repeat_count), eos=int(eos))


def probe_spec(script: list[int]) -> dict:
    """A probe request: the book forces it to emit `script`, which a plain engine would not."""
    return {"probe": [int(t) for t in script]}


def check_spec(spec) -> None:
    """ValueError naming the field when a request's spec is not one the book can run."""
    if not isinstance(spec, dict):
        raise ValueError(f"extra_args[{KEY!r}] must be a dict, got {type(spec).__name__}")
    if "probe" in spec:
        if not all(isinstance(t, int) for t in spec["probe"]):
            raise ValueError(f"extra_args[{KEY!r}]['probe'] must be a list of token ids")
        return
    for name, kind in _FIELDS.items():
        if name not in spec:
            raise ValueError(f"extra_args[{KEY!r}] lacks the field {name!r}")
        value = spec[name]
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok or (kind is int and isinstance(value, bool)):
            raise ValueError(f"extra_args[{KEY!r}][{name!r}] must be {kind.__name__}, got {value!r}")
    if spec["role"] not in ROLES:
        raise ValueError(f"extra_args[{KEY!r}]['role'] must be one of {ROLES}, got {spec['role']!r}")


class Pair:
    """What one pair has chosen so far, and the rules that decide its next token."""

    def __init__(self, spec: dict, tokenizer):
        self.key = spec["pair"]
        self.knobs = (spec["beta"], spec["top_p"], spec["temperature"])
        self.first, self.eos = spec["first"], spec["eos"]
        self.generator = generators_for([spec["seed"]])[0]
        self.guard = TailWatch(tokenizer, spec["markers"])
        self.repeat = RepetitionStop(spec["window"], spec["count"])
        self.chosen: list[int] = []
        self.stopped = False  # degenerate repetition: the next token is forced to eos
        self.rows = 0

    def force(self) -> float:
        return forced_lambda(len(self.chosen), self.guard.found, self.first)

    def record(self, token: int) -> None:
        self.chosen.append(token)
        self.guard.push(token)
        self.stopped = self.stopped or self.repeat.push(token)


@dataclass
class Row:
    out: Sized  # the engine's live output list of the request: read for its length only
    pair: Pair | None = None
    role: str = ""
    script: list[int] | None = None  # a probe row's forced tokens


class PairBook:
    """The rows of an engine batch that belong to hinted pairs, and the pairs themselves.

    `tokenizer` is a callable returning the tokenizer; it is called once, when the first pair
    that needs the answer guard arrives.
    """

    def __init__(self, tokenizer):
        self._load_tokenizer, self._tokenizer = tokenizer, None
        self.rows: dict[int, Row] = {}
        self.pairs: dict[str, Pair] = {}

    def new_row(self, spec: dict, out) -> Row:
        """The Row of a request entering the batch (`out`: anything whose len() is its output length)."""
        if "probe" in spec:
            return Row(out, script=list(spec["probe"]))
        pair = self.pairs.get(spec["pair"])
        if pair is None:
            if spec["markers"] and self._tokenizer is None:
                self._tokenizer = self._load_tokenizer()
            pair = self.pairs[spec["pair"]] = Pair(spec, self._tokenizer)
        pair.rows += 1
        return Row(out, pair, spec["role"])

    def release(self, row: Row | None) -> None:
        """Forget a row that left the batch, and its pair once both rows have left."""
        if row is not None and row.pair is not None:
            row.pair.rows -= 1
            if row.pair.rows == 0:
                del self.pairs[row.pair.key]

    def update(self, removed, added, moved) -> None:
        """Apply one batch change: `removed` indices, `added` (index, spec or None, live output
        list), `moved` (from, to, swap) in that order (an added row may take a removed slot)."""
        for index in removed:
            self.release(self.rows.pop(index, None))
        for index, spec, out in added:
            self.release(self.rows.pop(index, None))
            if spec is not None:
                self.rows[index] = self.new_row(spec, out)
        for a, b, swap in moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if swap and row_b is not None:
                self.rows[a] = row_b
            elif row_b is not None:  # a one-way move overwrites b
                self.release(row_b)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Decide the next token of every pair whose two rows are level, then mask each row
        that trails its record (and every probe row) to its next token."""
        if not self.rows:
            return logits
        n = logits.shape[0]
        return self.step(logits, [(index, row) for index, row in self.rows.items() if index < n])

    def step(self, logits: torch.Tensor, placed: list[tuple[int, Row]]) -> torch.Tensor:
        """`apply` for rows placed explicitly: (logits row, Row) for each row of this step."""
        halves: dict[int, dict] = {}
        for index, row in placed:
            if row.pair is not None:
                halves.setdefault(id(row.pair), {"pair": row.pair})[row.role] = (index, row)
        ready = []
        for half in halves.values():
            pair, h, s = half["pair"], half.get("hinted"), half.get("student")
            if h is not None and s is not None and len(h[1].out) == len(pair.chosen) == len(s[1].out):
                ready.append((pair, h[0], s[0]))
        if ready:
            self._decide(logits, ready)
        indices, tokens = [], []
        for index, row in placed:
            script = row.script if row.pair is None else row.pair.chosen
            k = len(row.out)
            if k < len(script):
                indices.append(index)
                tokens.append(script[k])
        if indices:
            rows = torch.tensor(indices, device=logits.device)
            wanted = torch.tensor(tokens, device=logits.device).unsqueeze(-1)
            vocab = torch.arange(logits.shape[-1], device=logits.device)
            logits[rows] = torch.where(vocab == wanted, 0.0, float("-inf")).to(logits.dtype)
        return logits

    def _decide(self, logits: torch.Tensor, ready) -> None:
        groups: dict[tuple, list] = {}
        for pair, h, s in ready:
            if pair.stopped:
                pair.record(pair.eos)  # the backend trims this eos off again
            else:
                groups.setdefault(pair.knobs, []).append((pair, h, s))
        for (beta, top_p, temperature), items in groups.items():
            hinted = torch.tensor([h for _, h, _ in items], device=logits.device)
            student = torch.tensor([s for _, _, s in items], device=logits.device)
            tokens, _ = hinted_step(
                logits[hinted], logits[student], beta=beta, top_p=top_p, temperature=temperature,
                generators=[pair.generator for pair, _, _ in items],
                force_lam=torch.tensor([pair.force() for pair, _, _ in items]),
            )
            for (pair, _, _), token in zip(items, tokens.tolist()):
                pair.record(token)

