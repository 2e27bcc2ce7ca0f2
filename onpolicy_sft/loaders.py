"""Loading demonstrations and preference pairs from the sources users have, as Datasets of the
normalised rows (``schema``): column mappings applied, duplicate ids made distinct, bad rows
raised or skipped and counted (``LoadReport``)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import datasets

from onpolicy_sft.schema import (DEMONSTRATION_COLUMNS, PREFERENCE_COLUMNS, columns_features, demonstration_row,
                                 preference_row)
from onpolicy_sft.sources import DataError, raw_records

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """Rows kept and rows skipped (``on_error="skip"``), by kind of problem, with the first messages."""

    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, error: DataError) -> None:
        self.skipped[error.kind] += 1
        if len(self.messages) < 20:
            self.messages.append(str(error))


def _rename(record: dict, columns: dict | None, ctx: dict) -> dict:
    """Apply ``columns`` ({our name: their column}) to one record."""
    if not columns:
        return record
    out = dict(record)
    for ours, theirs in columns.items():
        if theirs not in record:
            raise DataError(f"mapped column {theirs!r} is missing", field=theirs, kind="missing_field", **ctx)
        out[ours] = record[theirs]
    return out


def _read(source, normalise, names, *, split, columns, on_error, limit):
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    try:
        check_columns(columns or {}, names)
    except ValueError as err:
        raise DataError(str(err), source="columns", kind="invalid") from None
    name, rows = raw_records(source, split)
    report = LoadReport(source=name)
    out, seen = [], Counter()
    for where, record in rows:
        if limit is not None and len(out) >= limit:
            break
        ctx = {"source": name, "where": where}
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(f"expected an object, got {type(record).__name__}", kind="wrong_type", **ctx)
            row = normalise(_rename(record, columns, ctx), ctx)
        except DataError as exc:
            if on_error == "raise":
                raise
            report.add(exc)
            continue
        seen[row["id"]] += 1
        if seen[row["id"]] > 1:  # duplicate rows: the n-th copy gets a stable suffix
            row["id"] = f"{row['id']}-{seen[row['id']] - 1}"
        out.append(row)
    report.kept = len(out)
    if not out and limit != 0:  # say so here, not as a schema error from deep inside datasets
        why = (f"all {report.n_skipped} skipped ({', '.join(f'{k}: {v}' for k, v in sorted(report.skipped.items()))}); "
               f"first: {report.messages[0]}" if report.n_skipped else "the source is empty")
        raise DataError(f"no rows: {why}", source=name, kind="empty")
    if report.n_skipped:
        log.warning("%s: kept %d rows, skipped %d (%s); first: %s", name, report.kept, report.n_skipped,
                    ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items())), report.messages[0])
    else:
        log.info("%s: loaded %d rows", name, report.kept)
    return datasets.Dataset.from_list(out, features=columns_features(names)), report


def read_demonstrations(source, *, split: str = "train", columns: dict | None = None, on_error: str = "raise",
                        limit: int | None = None, require_answer: bool = True) -> tuple[datasets.Dataset, LoadReport]:
    """Demonstrations from a file (.jsonl/.json/.parquet/.csv), a saved dataset directory, a
    ``datasets.Dataset``/``DatasetDict``, a list of dicts, or a hub dataset name, as a Dataset
    with the columns ``id, prompt, response, answer, system, exemplars``, and the ``LoadReport``
    (rows kept, skips by reason).

    Shapes: ``{prompt, response|completion}`` (+ ``answer``, ``system``, ``id``); chat
    ``{messages: [...]}`` (system messages -> ``system``, the last assistant message is the
    response); TRL's conversational ``{prompt: [...], completion: [...]}``; GSM8K
    ``{question, answer: "... #### N"}`` (the answer text is the response, N the answer);
    MATH/NuminaMath ``{problem, solution}``. ``columns`` maps our names to yours, e.g.
    ``{"prompt": "instruction", "response": "output"}``.

    Every row has a reference answer: its ``answer`` value, else the final answer its response
    states (``grading.extract_answer``: the last ``\\boxed{}``, else ``#### N``). A row with
    neither is a bad row, unless ``require_answer=False`` (data only trained on or scored, never
    graded), where its answer is empty.

    Bad rows raise ``DataError`` naming the file, the line or row and the field; with
    ``on_error="skip"`` they are skipped, counted by reason and logged. A source with no rows
    left is an error either way.
    """
    return _read(source, lambda record, ctx: demonstration_row(record, ctx, require_answer), DEMONSTRATION_COLUMNS,
                 split=split, columns=columns, on_error=on_error, limit=limit)


def read_preferences(source, *, split: str = "train", columns: dict | None = None, on_error: str = "raise",
                     limit: int | None = None) -> tuple[datasets.Dataset, LoadReport]:
    """Preference pairs ``{prompt, chosen, rejected}`` (strings or message lists) as a Dataset with
    the columns ``id, prompt, chosen, rejected, answer, system, exemplars``, and the ``LoadReport``;
    sources and bad-input handling as in ``read_demonstrations``. Without a ``prompt``,
    conversational sides carry it themselves (TRL's implicit prompt: the messages before the last
    assistant message, the same in both). The answer is the ``answer`` value, else the one the
    chosen side states, else empty: pairs are trained on, not graded."""
    return _read(source, preference_row, PREFERENCE_COLUMNS, split=split, columns=columns, on_error=on_error,
                 limit=limit)


def parse_columns(items: list[str]) -> dict[str, str]:
    """``["prompt=instruction", ...]`` (the CLI's ``--columns``) as ``{our name: their column}``."""
    columns = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise DataError(f"a column mapping is OURS=THEIRS (e.g. prompt=instruction), not {item!r}",
                            source="--columns", kind="invalid")
        if ours.strip() not in set(DEMONSTRATION_COLUMNS) | set(PREFERENCE_COLUMNS):
            raise DataError(f"unknown column {ours.strip()!r} in {item!r}; ours are "
                            f"{sorted(set(DEMONSTRATION_COLUMNS) | set(PREFERENCE_COLUMNS))}", source="--columns")
        columns[ours.strip()] = theirs.strip()
    return columns


def check_columns(columns: dict[str, str], ours=DEMONSTRATION_COLUMNS) -> dict[str, str]:
    """``columns`` if no column of the source feeds two of ``ours`` (the fields of the rows read).
    ``prompt=response`` would read the reference solution as the prompt of every row while the
    same column stays the response; the source's column must be mapped away from our name too
    (``response=...``)."""
    fed_by: dict[str, list[str]] = {}
    for field_name, theirs in columns.items():
        fed_by.setdefault(theirs, []).append(field_name)
    for theirs, fields in fed_by.items():
        if theirs in ours and theirs not in columns:
            fields = [theirs, *fields]  # unmapped, our same-named field still reads it
        if len(set(fields)) > 1:
            raise ValueError(f"the column {theirs!r} would feed {' and '.join(repr(f) for f in fields)}; map each of "
                             f"our fields from its own column (e.g. --columns {fields[-1]}=OTHER)")
    return columns
