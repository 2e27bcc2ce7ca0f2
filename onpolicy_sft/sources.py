"""Files of rows, read and written: raw records from every source users have (.jsonl/.json/.parquet/
.csv files, saved dataset directories, ``datasets`` objects, lists of dicts, hub dataset names),
each with where it came from, and ``DataError``, a bad input located by source, line or row, and field."""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq


class DataError(ValueError):
    """Bad input, located: ``source``, ``where`` ("line 3" / "row 2") and ``field``."""

    def __init__(self, reason: str, *, source: str = "<data>", where: str | None = None, field: str | None = None,
                 kind: str = "invalid"):
        self.reason, self.source, self.where, self.field, self.kind = reason, source, where, field, kind
        parts = [source] + ([where] if where else []) + ([f"field {field!r}"] if field else [])
        super().__init__(f"{': '.join(parts)}: {reason}")


FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def raw_records(source, split: str):
    """(where, record) pairs from any supported source, plus the source's display name.

    Text is decoded with ``surrogateescape`` so that an undecodable byte becomes a marker that the
    row check reports with its line and field, instead of failing the whole file.
    """
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"no split {split!r}; available: {sorted(source)}", source="DatasetDict")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return f"Dataset[{split}]", ((f"row {i}", r) for i, r in enumerate(source))
    if isinstance(source, (list, tuple)):
        return "list", ((f"row {i}", r) for i, r in enumerate(source))
    path = Path(source)
    name = str(source)
    if path.is_dir():
        return name, raw_records(datasets.load_from_disk(str(path)), split)[1]
    if path.is_file():
        fmt = FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"unknown file type {path.suffix!r}; use one of {sorted(FILE_FORMATS)}", source=name)
        return name, _FILE_READERS[fmt](path, name)
    if any(name.endswith(ext) for ext in FILE_FORMATS) or "/" not in name and "." in name:
        raise DataError("no such file", source=name)
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, gated, ...: one clear message
        raise DataError(f"not a local file or directory, and loading it from the hub failed ({type(exc).__name__}: "
                        f"{exc}); offline, pass a local JSONL/JSON/parquet/CSV file or a saved dataset directory",
                        source=name, kind="unreadable") from exc
    return name, ((f"row {i}", r) for i, r in enumerate(loaded))


def _read_jsonl(path: Path, name: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:  # a byte-order mark (Windows editors write one) is no part of the first record
                raw = raw.removeprefix(codecs.BOM_UTF8)
            text = raw.decode("utf-8", "surrogateescape").strip()
            if not text:  # a blank line is no row (a trailing newline, a separator)
                continue
            try:
                yield f"line {lineno}", json.loads(text)
            except json.JSONDecodeError as exc:
                yield f"line {lineno}", DataError(f"malformed JSON ({exc.msg} at column {exc.colno})", source=name,
                                                  where=f"line {lineno}", kind="malformed")


def _read_json(path: Path, name: str):
    text = path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON ({exc.msg} at column {exc.colno})", source=name, where=f"line {exc.lineno}",
                        kind="malformed") from exc
    if isinstance(data, dict):  # {"data": [...]} and other single-list wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("expected a list of records or an object holding one list of records", source=name,
                            kind="malformed")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"expected a list of records, got {type(data).__name__}", source=name, kind="malformed")
    return ((f"row {i}", r) for i, r in enumerate(data))


def _read_parquet(path: Path, name: str):
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:
        raise DataError(f"unreadable parquet ({exc})", source=name, kind="unreadable") from exc
    return ((f"row {i}", r) for i, r in enumerate(rows))


def _read_csv(path: Path, name: str):
    # A byte-order mark would stick to the first column's name.
    text = path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        where = f"line {reader.line_num}"
        if None in row:  # more cells than header columns
            yield where, DataError(f"{len(row[None])} cells more than the header has", source=name, where=where,
                                   kind="malformed")
        else:
            yield where, row


_FILE_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}


def save_dataset(ds, path) -> Path:
    """Write a dataset as JSONL (.jsonl) or parquet (.parquet); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in ds:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif path.suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        raise ValueError(f"write .jsonl or .parquet, not {path.suffix!r}")
    return path
