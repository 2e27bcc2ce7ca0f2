"""The run layer: what every stage does around its ML, written once.

A stage (DDT scoring, the rewrite, evaluation, preference pairs, training, the loop, the
comparison) holds only its ML; this module gives it

- the launched processes (``process_state``) and their collectives: ``main_decides`` (the main
  process's value everywhere), ``on_main`` (work on the main process whose result, or error, every
  process gets), ``in_step`` (a barrier);
- ``RunDir``: its output directory for the life of the stage: the one lock (``rundir.RunLock``),
  the one fingerprint file (``fingerprint.json``: a resume with other inputs is refused, naming
  what changed), atomic writes made by the main process only, and a refusal on the main process
  raised on every process;
- two ways to split rows over the processes, whose results come back in input order on every
  process with the split recorded: ``map_shares`` (each process's round-robin share in one call,
  for batched generation) and ``map_shards`` (fixed work units, each saved as it finishes so a
  killed run resumes, with a progress tally summed over the processes after every round).

Under ``torchrun`` / ``accelerate launch`` every process runs every stage; without a launcher
there is one process and nothing is exchanged. On machines without a GPU the processes join over
gloo.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from onpolicy_sft.rundir import RunLock, check_fingerprint, check_writable, read_json, save_into, write_json, write_text

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"


# ---------------------------------------------------------------------------------------------
# Processes


def process_state() -> PartialState:
    """accelerate's view of the launched processes (a single process when none was launched)."""
    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    return process_state().is_main_process


def main_decides(value: Any) -> Any:
    """The main process's ``value`` on every process (a collective: every process must call it)."""
    if process_state().num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on the main process only; every process returns its result or raises its error, so
    a refusal there (a locked directory, changed inputs) stops all of them instead of leaving the
    others waiting at the next collective."""
    outcome = (None, None)
    if is_main():
        try:
            outcome = (fn(), None)
        except Exception as err:  # noqa: BLE001 -- raised on every process just below
            outcome = (None, err)
    result, error = main_decides(outcome)
    if error is not None:
        raise error
    return result


def in_step() -> None:
    """Every process waits here for the others (nothing to do with one process)."""
    process_state().wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# The output directory


class RunDir:
    """A stage's output directory for the life of the stage::

        with RunDir(out_dir, "rewrite", inputs) as run:
            ...
            run.write_json("stats.json", stats)

    Entering takes the directory's lock and checks it is writable, then records ``inputs`` in
    ``fingerprint.json`` (or, on a resume, refuses other inputs), all on the main process, with a
    refusal raised on every process. ``check_inputs`` does the fingerprint part later, for a stage
    that learns its inputs only once it has read its data. Writes are atomic and made by the main
    process only. ``RunDir(None, ...)`` is a stage run without an output directory: nothing is
    locked, checked or written, so the stage reads the same either way.
    """

    def __init__(self, path: str | Path | None, what: str, inputs: dict | None = None):
        self.path = None if path is None else Path(path)
        self.what, self._inputs = what, inputs
        self._lock: RunLock | None = None

    def __enter__(self) -> "RunDir":
        if self.path is not None:
            self._lock = RunLock(self.path, self.what)
            on_main(self._take)
            try:
                if self._inputs is not None:
                    self.check_inputs(self._inputs)
            except BaseException:  # a refused stage never reaches __exit__: let the lock go here
                self.__exit__(None, None, None)
                raise
        return self

    def _take(self) -> None:
        check_writable(self.path)  # first, so that an unusable path is named as such, not as a lock failure
        self._lock.__enter__()

    def __exit__(self, *exc) -> None:
        if self._lock is not None and is_main():
            self._lock.__exit__(*exc)
        self._lock = None

    def check_inputs(self, inputs: dict, *, restart: bool = False, what: str | None = None) -> None:
        """Record ``inputs`` or refuse a resume whose saved work came from others; ``restart``
        first forgets the inputs of earlier work that left nothing to resume. ``what`` names that
        saved work in a refusal (the stage's name when not given)."""
        if self.path is None:
            return
        file = self.path / FINGERPRINT

        def check() -> None:
            if restart:
                file.unlink(missing_ok=True)
            check_fingerprint(file, inputs, what or self.what)

        on_main(check)

    def file(self, name: str | Path) -> Path | None:
        return None if self.path is None else self.path / name

    def exists(self, name: str | Path) -> bool:
        """Whether the main process sees ``name`` here (the same answer on every process)."""
        return self.path is not None and main_decides((self.path / name).exists() if is_main() else None)

    def read_json(self, name: str | Path, default: Any = None) -> Any:
        return default if self.path is None else read_json(self.path / name, default)

    def write_json(self, name: str | Path, value: Any) -> None:
        if self.path is not None and is_main():
            write_json(self.path / name, value)

    def write_text(self, name: str | Path, text: str) -> None:
        if self.path is not None and is_main():
            write_text(self.path / name, text)

    def write_jsonl(self, name: str | Path, rows: Sequence[dict]) -> None:
        self.write_text(name, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# Rows over processes


@dataclass
class Mapped:
    """A map's results in input order, and how the rows were shared between the processes."""

    results: list
    processes: int
    rows_per_process: list[int]

    def record(self) -> dict:
        return {"processes": self.processes, "rows_per_process": self.rows_per_process}


def _gather_in_order(results: list[tuple[int, Any]], total: int, what: str, state: PartialState) -> list:
    if state.num_processes > 1:
        results = gather_object(results)
    by_index = dict(results)
    if len(by_index) != total or len(results) != total:
        raise RuntimeError(f"{what}: gathered {len(results)} results for {len(by_index)} of {total} items; "
                           "a process lost or duplicated some")
    return [by_index[i] for i in range(total)]


def _rows_per_process(sizes: Sequence[int], processes: int) -> list[int]:
    return [sum(sizes[rank::processes]) for rank in range(processes)]


def map_shares(fn: Callable[[list[int]], list], n: int, what: str) -> Mapped:
    """``fn(indices)`` over this process's round-robin share of ``range(n)`` (one call, so that a
    backend batches the share), returning one result per index; every process gets all ``n``
    results in order."""
    state = process_state()
    mine = list(range(state.process_index, n, state.num_processes))
    results = fn(mine) if mine else []
    if len(results) != len(mine):
        raise RuntimeError(f"{what}: {len(results)} results for {len(mine)} rows")
    gathered = _gather_in_order(list(zip(mine, results)), n, what, state)
    return Mapped(gathered, state.num_processes, _rows_per_process([1] * n, state.num_processes))


def map_shards(
    fn: Callable[[Any], Any],
    units: Sequence[Any],
    what: str,
    *,
    sizes: Sequence[int] | None = None,
    save_dir: Path | None = None,
    tally: Callable[[Any], dict[str, int]] | None = None,
    postfix: Callable[[Counter], dict] = dict,
    progress: bool = False,
    unit: str = "row",
) -> Mapped:
    """``fn(unit)`` for every one of ``units`` (JSON-able work units, e.g. lists of row indices),
    dealt round-robin to the processes; every process gets all results in order.

    With ``save_dir`` each result is saved there as soon as it exists (atomically, beside its
    unit), and a rerun reads back every saved result whose unit is the same instead of computing
    it: units must be deterministic work. A saved file that is cut short or corrupt is computed
    again, with a warning. ``sizes`` (rows per unit, default 1) feed the progress bar and the
    record of rows per process. The units go in rounds, one per process each; with ``progress``
    the main process shows a bar over all processes' rows, and beside it ``postfix`` of the
    ``tally(result)`` counts summed over every finished unit, exchanged after every round.
    """
    state = process_state()
    sizes = list(sizes) if sizes is not None else [1] * len(units)
    mine = list(range(state.process_index, len(units), state.num_processes))
    rounds = -(-len(units) // state.num_processes)
    bar = tqdm(total=sum(sizes), desc=what, unit=unit, disable=not (progress and state.is_main_process))
    totals: Counter = Counter()
    results = []
    try:
        for turn in range(rounds):
            done = []
            if turn < len(mine):
                index = mine[turn]
                result = _unit_result(fn, units[index], index, save_dir, what)
                results.append((index, result))
                done.append((sizes[index], tally(result) if tally else {}))
            if progress:
                _show_round(bar, totals, done, state, postfix)
    finally:
        bar.close()
    gathered = _gather_in_order(results, len(units), what, state)
    return Mapped(gathered, state.num_processes, _rows_per_process(sizes, state.num_processes))


def _unit_result(fn, unit, index: int, save_dir: Path | None, what: str):
    path = save_dir / f"{index:05d}.json" if save_dir is not None else None
    if path is not None and path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("unit") == json.loads(json.dumps(unit)):
                return saved["result"]
            problem = "it was made for another unit of work"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError) as err:
            problem = str(err) or type(err).__name__
        log.warning("%s: saved work %s is damaged (%s); computing it again", what, path, problem)
    result = fn(unit)
    if path is not None:
        write_json(path, {"unit": unit, "result": result})
    return result


def _show_round(bar, totals: Counter, done: list, state: PartialState, postfix: Callable[[Counter], dict]) -> None:
    if state.num_processes > 1:
        done = gather_object(done)
    for rows, counts in done:
        bar.update(rows)
        totals.update(counts)
    if totals:
        bar.set_postfix(postfix(totals))


def save_dataset(run: RunDir, name: str | Path, dataset) -> None:
    """``dataset`` saved (``save_to_disk``) as ``name`` in ``run``'s directory by the main process,
    staged in a new folder and moved into place (``rundir.save_into``), so no link planted there is
    followed; nothing without a directory."""
    if run.path is not None and is_main():
        target = run.path / name
        save_into(target.parent, lambda staging: dataset.save_to_disk(str(staging / target.name)))
