"""Worked examples shown before a question as earlier chat turns (few-shot prompting in chat form).

A small instruct model asked a question cold often never writes a final answer a checker can read;
shown two solved questions as earlier user/assistant turns, it answers in their shape. Every stage
renders a row's prompt through ``encoding.encode_row_prompt``, which puts the row's ``exemplars``
turns between the system turn and the question, so the rewrite's two streams, DDT, training (where
the turns carry no labels), evaluation and preference pairs all see the same tokens.

``data.exemplars`` in a run config says which examples a data source's rows get:

- unset: the source's own default (the arithmetic set: ``arith.DEFAULT_EXEMPLARS``; other sources
  none);
- ``0``: none;
- ``n``: n drawn from a pool (``data.exemplar_pool``, a file of ``{prompt, response}`` rows; the
  arithmetic set's built-in pool by default), seeded by ``data.seed``;
- a list of ``{prompt, response}``, or the path of a file of them: exactly those, in that order.

Rows that already carry turns of their own (a multi-turn TRL conversation) keep them.
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets

from onpolicy_sft import arith
from onpolicy_sft.schema import EXEMPLARS, exemplar_list
from onpolicy_sft.sources import DataError, raw_records


def read_exemplars(path: str | Path) -> list[dict]:
    """Every ``{prompt, response}`` row of a .jsonl/.json/.csv/.parquet file, in file order;
    DataError naming the file and line of a bad row."""
    name, rows = raw_records(str(path), "train")
    out = []
    for where, record in rows:
        if isinstance(record, DataError):
            raise record
        try:
            out += exemplar_list([record])
        except ValueError as err:
            raise DataError(str(err).replace("exemplar 0 ", "an exemplar "), source=name, where=where,
                            kind="malformed") from None
    if not out:
        raise DataError("no exemplars in the file", source=name, kind="empty")
    return out


def resolve(value, *, source: str, pool: str = "", seed: int = 0) -> list[dict]:
    """The exemplar turns that ``data.exemplars`` = ``value`` names (module docstring).
    ValueError starting with the setting's name when the value cannot be used."""
    if value is None:
        return [dict(e) for e in arith.DEFAULT_EXEMPLARS] if source == "arithmetic" else []
    if isinstance(value, bool):
        raise ValueError(f"exemplars: expected a number, a list or a file path, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"exemplars: must be >= 0, got {value}")
        if value == 0:
            return []
        candidates = read_exemplars(pool) if pool else (
            [dict(e) for e in arith.EXEMPLAR_POOL] if source == "arithmetic" else None)
        if candidates is None:
            raise ValueError(f"exemplars: {value} draws from a pool, but data.source {source!r} has none: "
                             "set data.exemplar_pool to a file of {prompt, response} rows")
        if value > len(candidates):
            raise ValueError(f"exemplars: {value} exceeds the pool's {len(candidates)} examples")
        return random.Random(f"exemplars/{seed}").sample(candidates, value)
    if isinstance(value, str):
        if not Path(value).is_file():
            raise ValueError(f"exemplars: no file {value}")
        return read_exemplars(value)
    try:
        return exemplar_list(value)
    except ValueError as err:
        raise ValueError(f"exemplars: {err}") from None


def with_exemplars(dataset: datasets.Dataset, turns: list[dict]) -> datasets.Dataset:
    """``dataset`` whose rows without turns of their own get ``turns`` (a typed ``exemplars`` column)."""
    own = dataset["exemplars"] if "exemplars" in dataset.column_names else [[]] * len(dataset)
    if "exemplars" in dataset.column_names:
        dataset = dataset.remove_columns("exemplars")
    return dataset.add_column("exemplars", [t or turns for t in own], feature=EXEMPLARS)
