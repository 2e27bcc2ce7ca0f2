"""Data parallelism over rows, the one way every stage splits work across launched processes.

Under ``torchrun`` or ``accelerate launch`` with N processes, a stage deals its rows (or batches
of rows) round-robin to the processes, each process works on its own share with its own model or
engine, and the results are gathered back in input order, so every process returns what one
process would have. Without a launcher there is one process and nothing is exchanged. On
machines without a GPU the processes join over gloo.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather_object


def process_state() -> PartialState:
    """accelerate's view of the launched processes (a single process when none was launched)."""
    return PartialState(cpu=not torch.cuda.is_available())


def my_share(items: Sequence[Any], state: PartialState | None = None) -> list[int]:
    """Indices into ``items`` that this process works on: every N-th, starting at its rank."""
    state = state or process_state()
    return list(range(state.process_index, len(items), state.num_processes))


def gather_in_order(results: list[tuple[int, Any]], total: int, what: str,
                    state: PartialState | None = None) -> list[Any]:
    """Every process's ``(index, result)`` pairs merged into one list in index order, on every process.

    Refuses (rather than returns a short list) when an index is missing or produced twice.
    """
    state = state or process_state()
    if state.num_processes > 1:
        results = gather_object(results)
    by_index = dict(results)
    if len(by_index) != total or len(results) != total:
        raise RuntimeError(f"{what}: gathered {len(results)} results for {len(by_index)} of {total} items; "
                           "a process lost or duplicated some")
    return [by_index[i] for i in range(total)]


def shares_per_process(total: int, state: PartialState | None = None) -> list[int]:
    """How many of ``total`` round-robin items each process got: for the stage's record."""
    state = state or process_state()
    n = state.num_processes
    return [len(range(rank, total, n)) for rank in range(n)]
