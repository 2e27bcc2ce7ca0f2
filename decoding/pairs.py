"""Hinted Decoding inside an inference engine's batch: the pair logic, with no engine in it.

Each (hinted, student) pair is two requests of one engine batch. Every step the engine hands a
batch-level logits processor the logits of all its rows; `PairBook.apply` finds the two rows of
each pair, mixes them (decoding.mixing.hinted_step), draws one token per pair and masks both rows
to it, so that a greedy engine sampler emits that token for both streams. The engine-facing
adapters (decoding.vllm_mixer) only translate the engine's batch updates into `PairBook.update`.

Token values come only from the book's own record of what each pair chose: with asynchronous
scheduling the engine's output lists hold placeholders for the token in flight, so they are read
for their lengths alone.

The book is sized for GPU batches of thousands of rows, where whatever it does on the host is added
to every decode step: its state lives in arrays indexed by pair, every rule runs on all pairs at
once, and per-pair Python runs only at batch changes and in rare events (a token whose text depends
on its neighbours, a window that may have repeated too often). The chosen tokens reach the host
once per step, at the start of the next step (when the engine has long had them), in the step's one
device-to-host copy; the step's indices, forced λs and uniforms go to the device in one
host-to-device copy.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass

import numpy as np
import torch

from .mixing import hinted_step, mix64, stream_keys, uniforms
from .rules import MarkerTokens

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
    """A pair's name, its slot in the book's arrays and how many of its rows are in the batch."""

    def __init__(self, key: str, slot: int):
        self.key, self.slot, self.rows = key, slot, 0


@dataclass
class Row:
    out: Sized | None  # the engine's live output list of the request: read for its length only
    pair: Pair | None = None
    role: str = ""
    script: list[int] | None = None  # a probe row's forced tokens
    handle: int = -1  # the row's index into the book's row arrays


_ROLE = {"hinted": 0, "student": 1}
# Per pair slot: its rows' handles, its step count, its stream key, its rules and their state.
_PAIR_FIELDS = {"hinted": (np.int64, -1), "student": (np.int64, -1), "count": (np.int64, 0),
                "key": (np.uint64, 0), "first": (bool, False), "eos": (np.int64, 0), "knobs": (np.int64, 0),
                "guard": (np.int64, -1), "marker": (np.int64, 0), "found": (bool, False), "stopped": (bool, False),
                "window": (np.int64, 1), "repeat": (np.int64, 2), "salt": (np.uint64, 0)}
_BASE = np.uint64(0x100000001B3)  # the window hash's polynomial base (odd, so no power of it is 0)


def _grown(array: np.ndarray, size: int, fill) -> np.ndarray:
    out = np.full((size, *array.shape[1:]), fill, dtype=array.dtype)
    out[: len(array)] = array
    return out


class PairBook:
    """The rows of an engine batch that belong to hinted pairs, and the pairs themselves.

    `tokenizer` is a callable returning the tokenizer; it is called once, when the first pair
    that needs the answer guard arrives.
    """

    TABLE_BITS = 22  # window counts of the repetition stop, shared by all pairs (16 MiB)

    def __init__(self, tokenizer):
        self._load_tokenizer, self._tokenizer = tokenizer, None
        self.rows: dict[int, Row] = {}
        self.pairs: dict[str, Pair] = {}
        self._placed = None  # (indices, handles, output lists) of self.rows, rebuilt after a batch change
        self._pending = None  # the last step's choices, recorded on the host at the next step
        self._row_pair = np.zeros(0, np.int64)
        self._row_role = np.zeros(0, np.int64)  # 0 hinted, 1 student, -1 probe or free
        self._free_rows: list[int] = []
        self._scripts: dict[int, list[int]] = {}
        self._p = {name: np.zeros(0, dtype) for name, (dtype, _) in _PAIR_FIELDS.items()}
        self._free_slots: list[int] = []
        self._history = np.zeros((0, 64), np.int64)  # [slot, position]: the tokens each pair chose
        self._knobs: dict[tuple, int] = {}
        self._guards: dict[tuple, int] = {}
        self._guard_list: list[MarkerTokens] = []
        self._table = np.zeros(1 << self.TABLE_BITS, np.int32)
        self._powers = np.ones(1, np.uint64)
        self._pairs_made = 0

    # -- batch changes -------------------------------------------------------------------
    def new_row(self, spec: dict, out) -> Row:
        """The Row of a request entering the batch (`out`: anything whose len() is its output length)."""
        self._settle()
        self._placed = None
        handle = self._new_handle()
        if "probe" in spec:
            self._scripts[handle] = list(spec["probe"])
            return Row(out, script=self._scripts[handle], handle=handle)
        pair = self.pairs.get(spec["pair"])
        if pair is None:
            if spec["markers"] and self._tokenizer is None:
                self._tokenizer = self._load_tokenizer()
            pair = self.pairs[spec["pair"]] = Pair(spec["pair"], self._new_pair(spec))
        pair.rows += 1
        self._row_pair[handle], self._row_role[handle] = pair.slot, _ROLE[spec["role"]]
        self._p[spec["role"]][pair.slot] = handle
        return Row(out, pair, spec["role"], handle=handle)

    def release(self, row: Row | None) -> None:
        """Forget a row that left the batch, and its pair once both rows have left."""
        if row is None:
            return
        self._settle()
        self._placed = None
        self._row_pair[row.handle], self._row_role[row.handle] = -1, -1
        self._scripts.pop(row.handle, None)
        self._free_rows.append(row.handle)
        if row.pair is not None:
            slot = row.pair.slot
            if self._p[row.role][slot] == row.handle:
                self._p[row.role][slot] = -1
            row.pair.rows -= 1
            if row.pair.rows == 0:
                del self.pairs[row.pair.key]
                self._forget(slot)

    def update(self, removed, added, moved) -> None:
        """Apply one batch change: `removed` indices, `added` (index, spec or None, live output
        list), `moved` (from, to, swap) in that order (an added row may take a removed slot)."""
        self._settle()
        self._placed = None
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

    def _new_handle(self) -> int:
        if not self._free_rows:
            size = len(self._row_pair)
            self._row_pair = _grown(self._row_pair, max(16, 2 * size), -1)
            self._row_role = _grown(self._row_role, max(16, 2 * size), -1)
            self._free_rows = list(range(len(self._row_pair) - 1, size - 1, -1))
        return self._free_rows.pop()

    def _new_pair(self, spec: dict) -> int:
        if not self._free_slots:
            size = len(self._p["count"])
            grown = max(8, 2 * size)
            self._p = {name: _grown(self._p[name], grown, _PAIR_FIELDS[name][1]) for name in self._p}
            self._history = _grown(self._history, grown, 0)
            self._free_slots = list(range(grown - 1, size - 1, -1))
        slot = self._free_slots.pop()
        knobs = (spec["beta"], spec["top_p"], spec["temperature"])
        guard = -1
        if spec["markers"] and self._tokenizer is not None:
            markers = tuple(spec["markers"])
            if markers not in self._guards:
                self._guards[markers] = len(self._guard_list)
                self._guard_list.append(MarkerTokens(self._tokenizer, markers))
            guard = self._guards[markers]
        self._pairs_made += 1
        values = {"hinted": -1, "student": -1, "count": 0, "key": stream_keys([spec["seed"]])[0],
                  "first": spec["first"], "eos": spec["eos"], "knobs": self._knobs.setdefault(knobs, len(self._knobs)),
                  "guard": guard, "marker": 0, "found": False, "stopped": False, "window": spec["window"], "repeat": spec["count"],
                  "salt": mix64(np.array([self._pairs_made], np.uint64))[0]}
        for name, value in values.items():
            self._p[name][slot] = value
        return slot

    def _forget(self, slot: int) -> None:
        """Free a pair's slot, taking its windows back out of the shared counts."""
        n, width = int(self._p["count"][slot]), int(self._p["window"][slot])
        if n >= width:
            windows = np.lib.stride_tricks.sliding_window_view(self._history[slot, :n], width)
            hashes = ((windows + 1).astype(np.uint64) * self._power(width)[::-1]).sum(1, dtype=np.uint64)
            np.subtract.at(self._table, self._table_index(hashes, self._p["salt"][slot]), 1)
        self._free_slots.append(slot)

    # -- one decode step -----------------------------------------------------------------
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Decide the next token of every pair whose two rows are level, then mask each row
        that trails its record (and every probe row) to its next token."""
        if not self.rows:
            return logits
        if self._placed is None:
            items = sorted(self.rows.items())
            self._placed = (np.array([i for i, _ in items], np.int64), np.array([r.handle for _, r in items], np.int64),
                            [r.out for _, r in items])
        index, handle, outs = self._placed
        length = np.fromiter(map(len, outs), np.int64, len(outs))
        inside = index < logits.shape[0]
        if not inside.all():
            index, handle, length = index[inside], handle[inside], length[inside]
        return self.step(logits, index, handle, length)

    def step(self, logits: torch.Tensor, index: np.ndarray, handle: np.ndarray, length: np.ndarray) -> torch.Tensor:
        """`apply` for rows placed explicitly: per row of this step, its logits row, its Row's
        handle and its output length (numpy int arrays)."""
        self._settle()
        p, count = self._p, self._p["count"]
        pair, role = self._row_pair[handle], self._row_role[handle]
        fixed_rows, fixed_tokens = [], []  # rows whose token the host already knows
        probe = role < 0
        if probe.any():
            for i, h, k in zip(index[probe].tolist(), handle[probe].tolist(), length[probe].tolist()):
                if k < len(self._scripts[h]):
                    fixed_rows.append(np.array([i]))
                    fixed_tokens.append(np.array([self._scripts[h][k]]))
            index, pair, role, length = index[~probe], pair[~probe], role[~probe], length[~probe]
        at = np.full((2, len(count)), -1, np.int64)
        level = np.full((2, len(count)), -1, np.int64)
        at[role, pair], level[role, pair] = index, length
        ready = np.flatnonzero((at[0] >= 0) & (at[1] >= 0) & (level[0] == count) & (level[1] == count))
        behind = length < count[pair]
        if behind.any():
            fixed_rows.append(index[behind])
            fixed_tokens.append(self._history[pair[behind], length[behind]])
        stopped = p["stopped"][ready]
        ended, decide = ready[stopped], ready[~stopped]
        ended_eos = p["eos"][ended]
        fixed_rows += [at[0, ended], at[1, ended]]
        fixed_tokens += [ended_eos, ended_eos]
        decide = decide[np.argsort(p["knobs"][decide], kind="stable")]
        steps = count[decide]
        lam = np.where(p["found"][decide], 1.0, np.where((steps == 0) & p["first"][decide], 0.0, np.nan))
        rows_fixed, tokens_fixed = np.concatenate(fixed_rows), np.concatenate(fixed_tokens)
        d, f = len(decide), len(rows_fixed)
        if d + f == 0:
            return logits
        packed = np.concatenate([at[0, decide], at[1, decide], rows_fixed, tokens_fixed, lam.view(np.int64),
                                 uniforms(p["key"][decide], steps).view(np.int64)])
        packed = torch.from_numpy(packed).to(logits.device, non_blocking=True)
        hinted, student = packed[:d], packed[d : 2 * d]
        lam_d, u_d = packed[2 * d + 2 * f : 3 * d + 2 * f].view(torch.float64), packed[3 * d + 2 * f :].view(torch.float64)
        chosen = []
        knobs = p["knobs"][decide]
        starts = [0, *(np.flatnonzero(np.diff(knobs)) + 1).tolist(), d]
        knob_values = list(self._knobs)
        for a, b in zip(starts[:-1], starts[1:]):
            if a == b:
                continue
            beta, top_p, temperature = knob_values[knobs[a]]
            tokens, _ = hinted_step(logits[hinted[a:b]], logits[student[a:b]], beta=beta, top_p=top_p,
                                    temperature=temperature, u=u_d[a:b], force_lam=lam_d[a:b])
            chosen.append(tokens)
        chosen = torch.cat(chosen) if chosen else packed[:0]
        rows = torch.cat([hinted, student, packed[2 * d : 2 * d + f]])
        logits.index_fill_(0, rows, float("-inf"))
        logits[rows, torch.cat([chosen, chosen, packed[2 * d + f : 2 * d + 2 * f]])] = 0.0
        if len(ready):
            self._pending = (np.concatenate([decide, ended]), chosen, ended_eos, np.concatenate([steps, count[ended]]))
            count[ready] += 1
        return logits

    # -- the rules, on the host, one step late -------------------------------------------
    def _settle(self) -> None:
        """Record the last step's tokens and run the answer guard and the repetition stop on them."""
        if self._pending is None:
            return
        slots, chosen, eos, at = self._pending
        self._pending = None
        tokens = np.concatenate([chosen.cpu().numpy(), eos])  # the step's one device-to-host copy
        if at.max(initial=-1) >= self._history.shape[1]:
            wider = np.zeros((len(self._history), 2 * (int(at.max()) + 1)), np.int64)
            wider[:, : self._history.shape[1]] = self._history
            self._history = wider
        self._history[slots, at] = tokens
        n, p = at + 1, self._p
        guard = p["guard"][slots]
        look = (guard >= 0) & ~p["found"][slots]
        for g in np.unique(guard[look]).tolist():
            watch, mine = self._guard_list[g], np.flatnonzero(look & (guard == g))
            state = watch.step(p["marker"][slots[mine]], tokens[mine])
            for j in np.flatnonzero((state == watch.UNSURE) | (n[mine] == 1)).tolist():
                slot, end = int(slots[mine[j]]), int(n[mine[j]])
                state[j] = watch.read(self._history[slot, max(0, end - watch.span) : end].tolist())
            p["found"][slots[mine]] = state == watch.FOUND
            p["marker"][slots[mine]] = np.maximum(state, 0)
        width = p["window"][slots]
        full = n >= width
        if not full.any():
            return
        slots, n, width = slots[full], n[full], width[full]
        span = int(width.max())
        offsets = np.arange(span)
        cols = np.maximum(n[:, None] - span + offsets, 0)
        values = np.where(offsets >= span - width[:, None], self._history[slots[:, None], cols] + 1, 0)
        hashes = (values.astype(np.uint64) * self._power(span)[::-1]).sum(1, dtype=np.uint64)
        index = self._table_index(hashes, p["salt"][slots])
        np.add.at(self._table, index, 1)
        # Shared counts only overestimate (other windows may land on the same entry): confirm exactly.
        maybe = (self._table[index] >= p["repeat"][slots]) & ~p["stopped"][slots]
        for slot, end, w in zip(slots[maybe].tolist(), n[maybe].tolist(), width[maybe].tolist()):
            windows = np.lib.stride_tricks.sliding_window_view(self._history[slot, :end], w)
            if (windows == windows[-1]).all(1).sum() >= p["repeat"][slot]:
                p["stopped"][slot] = True

    def _power(self, span: int) -> np.ndarray:
        """_BASE ** k for k < span, wrapping like every uint64 here."""
        while len(self._powers) < span:
            self._powers = np.append(self._powers, self._powers[-1:] * _BASE)
        return self._powers[:span]

    def _table_index(self, hashes: np.ndarray, salt) -> np.ndarray:
        return (mix64(hashes ^ salt) >> np.uint64(64 - self.TABLE_BITS)).astype(np.int64)
