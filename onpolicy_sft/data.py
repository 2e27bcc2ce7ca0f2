"""Demonstration data: one normalised schema, chat-template tokenisation with response-only labels.

Every loader returns a ``datasets.Dataset`` with the columns ``id, prompt, response, answer, system``
(preferences: ``id, prompt, chosen, rejected, answer, system``), whatever shape the rows came in.
Tokenisation renders the prompt with the model's own chat template and appends the response
tokens plus the end-of-turn token, so that the model learns to stop; only those tokens carry
labels.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import torch

from onpolicy_sft.grading import extract_answer, hashes_answer
from onpolicy_sft.ops import IGNORE_INDEX

log = logging.getLogger(__name__)


def _special_texts(tokenizer) -> list[str]:
    """The texts that the tokenizer reads as special (control) tokens wherever they appear."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def _ids(out) -> list[int]:
    # apply_chat_template returns a BatchEncoding in newer transformers, a plain list in older ones
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as plain text: a special-token string in it (``<|im_end|>`` written
    in a prompt or a response) is spelled out in ordinary tokens, never read as a control token."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def chat_messages(prompt: str, system: str = "", exemplars=()) -> list[dict]:
    """The chat a prompt is rendered as: the system turn, each worked example as an earlier user
    turn and the assistant's answer to it, then the question as the last user turn."""
    messages = [{"role": "system", "content": system}] if system else []
    for example in exemplars:
        messages += [{"role": "user", "content": example["prompt"]},
                     {"role": "assistant", "content": example["response"]}]
    return messages + [{"role": "user", "content": prompt}]


def encode_prompt(tokenizer, prompt: str, system: str = "", exemplars=()) -> list[int]:
    """Token ids of the chat-formatted prompt (``chat_messages``), ending with the assistant header
    (generation prompt).

    The template's own markup keeps its control tokens; the user's text (prompt, system and the
    exemplars) is tokenised as plain text (``encode_text``), so that writing ``<|im_end|>`` in a
    question cannot end the turn.
    """
    messages = chat_messages(prompt, system, exemplars)
    specials = _special_texts(tokenizer)
    if not any(sp in m["content"] for m in messages for sp in specials):
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    # Render the template around a placeholder per message, then tokenise the markup between the
    # placeholders as the template's text and each message's content as plain text.
    marks = [f"\x00{i}\x00" for i in range(len(messages))]
    skeleton = tokenizer.apply_chat_template([{**m, "content": k} for m, k in zip(messages, marks)],
                                             add_generation_prompt=True, tokenize=False)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pieces, rest = [], skeleton
    for m, k in zip(messages, marks):
        head, sep, tail = rest.partition(k)
        if sep:  # (a template may leave a message out, e.g. one without a system turn)
            pieces += [(head, False), (m["content"], True)]
            rest = tail
    pieces.append((rest, False))
    if "".join(text for text, _ in pieces) != rendered:
        raise ValueError("this chat template changes the message text it renders, so a special-token string in "
                         "the prompt cannot be kept as plain text; remove it from the prompt or system text")
    ids = []
    for text, plain in pieces:
        ids += encode_text(tokenizer, text) if plain else list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def encode_row_prompt(tokenizer, row: dict) -> list[int]:
    """``encode_prompt`` of a row: its prompt under its own system text and exemplar turns. Every
    stage renders a row's prompt through here, so all of them see the same tokens."""
    return encode_prompt(tokenizer, row["prompt"], row.get("system") or "", row.get("exemplars") or ())


def encode_example(tokenizer, prompt: str, response: str, system: str = "", max_length: int | None = None,
                   truncated: bool = False, exemplars=()) -> dict:
    """``input_ids`` = prompt + response + eos; UNSHIFTED ``labels`` with IGNORE_INDEX over the prompt.

    ``truncated`` marks a response cut off at a generation limit: it gets no eos, which the model
    never wrote there (scored, it would read as a very unlikely token; trained, as a stop to learn).

    The eos token is the chat template's end-of-turn token (``<|im_end|>`` for ChatML models), so
    the concatenation equals the template's rendering of the whole conversation up to the
    newline the template writes after it. (Only the token split can differ, and only when the
    response starts with a blank line: a byte-level BPE then merges newlines across the prompt
    boundary; the text is the same.) ``max_length`` cuts the end (the response side); the texts are
    first cut to ``text_bound`` characters, so a huge row costs memory for its first
    ``max_length`` tokens only, and those tokens are the same. Exemplar turns are part of the
    prompt, so they carry no labels: only the final response is learned.
    """
    if max_length is not None:
        bound = text_bound(tokenizer, max_length)
        prompt, response, system = prompt[:bound], response[:bound], system[:bound]
    prompt_ids = encode_prompt(tokenizer, prompt, system, exemplars)
    response_ids = encode_text(tokenizer, response)
    if not truncated:
        response_ids.append(tokenizer.eos_token_id)
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


# Tokens past the cap that a cut text still yields: what a cut can change (the split of the last,
# cut word) stays this far beyond the cap.
BOUND_MARGIN_TOKENS = 64


def text_bound(tokenizer, max_tokens: int) -> int:
    """A number of characters whose text always yields more than ``max_tokens`` tokens: no token
    spells more characters than the longest vocabulary entry (byte-level and SentencePiece entries
    spell one character per byte or space, at least as many as they decode to), so the first
    ``max_tokens`` ids of a text cut there are those of the whole text. This assumes the
    tokenizer's normaliser does not fold several characters into one (NFKC composition can)."""
    longest = _longest_token(tokenizer)
    return (max_tokens + BOUND_MARGIN_TOKENS) * longest


_LONGEST_TOKEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _longest_token(tokenizer) -> int:
    """Characters in the longest vocabulary entry; kept per tokenizer and size (added tokens change it)."""
    size, longest = _LONGEST_TOKEN.get(tokenizer, (None, 0))
    if size != len(tokenizer):
        size, longest = len(tokenizer), max(len(token) for token in tokenizer.get_vocab())
        _LONGEST_TOKEN[tokenizer] = (size, longest)
    return longest


def encode_row(tokenizer, row: dict, column: str = "response", max_length: int | None = None) -> dict:
    """``encode_example`` of a row's prompt, system, exemplars and ``column``; a true
    ``<column>_truncated`` marks that response as cut off at a generation limit."""
    return encode_example(tokenizer, row["prompt"], row[column], row.get("system") or "", max_length=max_length,
                          truncated=bool(row.get(f"{column}_truncated")), exemplars=row.get("exemplars") or ())


def collate(rows: list[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad ``input_ids``/``labels`` rows into long tensors; padding gets IGNORE_INDEX and mask 0."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[i, span] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, span] = torch.as_tensor(row["labels"], dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Tokenising a dataset


@dataclass
class TokenizeReport:
    """What ``tokenize_dataset`` did with rows longer than ``max_length``."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped_overlong: int = 0
    skipped_prompt_too_long: int = 0  # no room for a single response token: nothing to learn from


def tokenize_with_report(ds, tokenizer, *, max_length: int, overlong: str = "truncate"):
    """``tokenize_dataset`` that also returns its ``TokenizeReport``."""
    if overlong not in ("truncate", "skip"):
        raise ValueError(f"overlong must be 'truncate' or 'skip', not {overlong!r}")
    missing = {"prompt", "response"} - set(ds.column_names)
    if missing:
        raise ValueError(f"tokenize_dataset needs columns prompt and response; missing {sorted(missing)}")

    def encode(row):
        enc = encode_row(tokenizer, row)
        n_prompt = sum(1 for x in enc["labels"] if x == IGNORE_INDEX)
        return {**enc, "_n_prompt": n_prompt, "_n": len(enc["input_ids"])}

    encoded = ds.map(encode, desc="tokenizing")
    report = TokenizeReport(rows=len(encoded))
    keep = []
    for i, (n, n_prompt) in enumerate(zip(encoded["_n"], encoded["_n_prompt"])):
        if n <= max_length:
            keep.append(i)
        elif n_prompt >= max_length:
            report.skipped_prompt_too_long += 1
        elif overlong == "skip":
            report.skipped_overlong += 1
        else:
            report.truncated += 1
            keep.append(i)
    out = encoded.select(keep).remove_columns(["_n", "_n_prompt"])
    if report.truncated:
        out = out.map(lambda r: {"input_ids": r["input_ids"][:max_length], "labels": r["labels"][:max_length]},
                      desc="truncating")
    report.kept = len(out)
    log.info("tokenized %d rows (max_length %d): kept %d, truncated %d, skipped %d overlong and %d whose prompt "
             "alone fills max_length", report.rows, max_length, report.kept, report.truncated,
             report.skipped_overlong, report.skipped_prompt_too_long)
    return out, report


def tokenize_dataset(ds, tokenizer, *, max_length: int, overlong: str = "truncate"):
    """Add ``input_ids``/``labels`` (response-only) to every row; over-long rows are truncated or
    skipped by ``overlong`` and counted in the log either way. A row whose prompt alone reaches
    ``max_length`` is always skipped (and counted): it would carry no label. A true
    ``response_truncated`` marks a response cut off at a generation limit (``encode_row``)."""
    return tokenize_with_report(ds, tokenizer, max_length=max_length, overlong=overlong)[0]


# ---------------------------------------------------------------------------------------------
# Loading demonstrations in the shapes users have


class DataError(ValueError):
    """Bad input, located: ``source``, ``where`` ("line 3" / "row 2") and ``field``."""

    def __init__(self, reason: str, *, source: str = "<data>", where: str | None = None, field: str | None = None,
                 kind: str = "invalid"):
        self.reason, self.source, self.where, self.field, self.kind = reason, source, where, field, kind
        parts = [source] + ([where] if where else []) + ([f"field {field!r}"] if field else [])
        super().__init__(f"{': '.join(parts)}: {reason}")


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


DEMONSTRATION_COLUMNS = ("id", "prompt", "response", "answer", "system", "exemplars")
PREFERENCE_COLUMNS = ("id", "prompt", "chosen", "rejected", "answer", "system", "exemplars")
# Worked examples rendered as earlier chat turns before the row's prompt (``chat_messages``).
EXEMPLARS = datasets.List({"prompt": datasets.Value("string"), "response": datasets.Value("string")})


def columns_features(names) -> datasets.Features:
    """The schema of normalised rows: every column a string but ``exemplars``."""
    return datasets.Features({k: EXEMPLARS if k == "exemplars" else datasets.Value("string") for k in names})
FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def stable_id(*parts: str) -> str:
    """Content hash of a row, so that the same row has the same id in every run and format."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()[:16]


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


def _text(record: dict, key: str, ctx: dict, *, required: bool = True, allow_empty: bool = False) -> str:
    """``record[key]`` as a checked string: present, a string, decodable, and (unless allowed) non-empty."""
    value = record.get(key)
    if value is None:
        if required:
            raise DataError("missing", field=key, kind="missing_field", **ctx)
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or (
            not isinstance(value, str) and key not in ("answer", "id")):
        raise DataError(f"expected a string, got {type(value).__name__}", field=key, kind="wrong_type", **ctx)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError("undecodable bytes (not UTF-8)", field=key, kind="undecodable", **ctx) from None
    if required and not allow_empty and not value.strip():
        raise DataError("empty", field=key, kind="empty_field", **ctx)
    return value


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


def _chat(messages, ctx: dict, key: str = "messages") -> tuple[str, list[dict], str, str]:
    """(system, exemplars, prompt, response) of a chat: the last assistant message is the response,
    the user message before it the prompt, and every earlier user/assistant exchange an exemplar
    turn, rendered again before the prompt wherever the row is used."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError("expected a list of {role, content} messages", field=key, kind="wrong_type", **ctx)
    roles = {"human": "user", "gpt": "assistant"}  # ShareGPT spelling
    turns = [(roles.get(m.get("role", m.get("from")), m.get("role", m.get("from"))), m.get("content", m.get("value")))
             for m in messages]
    for role, content in turns:
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise DataError(f"bad message (role {role!r}, content {type(content).__name__})", field=key,
                            kind="wrong_type", **ctx)
    system = "\n".join(c for r, c in turns if r == "system")
    dialog = [(r, c) for r, c in turns if r != "system"]
    if not dialog or dialog[-1][0] != "assistant":
        raise DataError("the last message is not an assistant message", field=key, kind="missing_field", **ctx)
    if len(dialog) % 2 or any(r != ("user", "assistant")[i % 2] for i, (r, _) in enumerate(dialog)):
        raise DataError(f"expected user and assistant messages taking turns, got {[r for r, _ in dialog]}",
                        field=key, kind="malformed", **ctx)
    exemplars = [{"prompt": dialog[i][1], "response": dialog[i + 1][1]} for i in range(0, len(dialog) - 2, 2)]
    return system, exemplars, dialog[-2][1], dialog[-1][1]


def _messages(value, key: str, ctx: dict) -> list[dict]:
    """One side of a conversational row as a message list: a list as it is, a string as one message
    (a user message for the prompt, an assistant message otherwise), nothing as no message."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise DataError("expected a string or a list of {role, content} messages", field=key, kind="wrong_type", **ctx)
    return value


def _reference_answer(record: dict, text: str, ctx: dict, *, source_field: str, required: bool) -> str:
    """The row's ``answer`` value, else the final answer that ``text`` states, read by the rules of
    ``grading.extract_answer`` (its last ``\\boxed{}``, else its ``#### N``)."""
    answer = _text(record, "answer", ctx, required=False).strip() or extract_answer(text) or ""
    if not answer and required:
        raise DataError(f"no reference answer: no 'answer' value, and the {source_field} states no final answer "
                        "(a terminated \\boxed{...} or a '#### N' line); rows without one can be trained on or "
                        "scored but never graded: load them with require_answer=False for that",
                        field=source_field, kind="missing_answer", **ctx)
    return answer


def _exemplars(record: dict, ctx: dict) -> list[dict]:
    """A row's exemplar turns: a list of ``{prompt, response}`` (none when the field is absent)."""
    value = record.get("exemplars")
    if value is None:
        return []
    try:
        return exemplar_list(value)
    except ValueError as err:
        raise DataError(str(err), field="exemplars", kind="malformed", **ctx) from None


def exemplar_list(value) -> list[dict]:
    """``value`` as a list of ``{"prompt": str, "response": str}``; ValueError saying what is wrong."""
    if not isinstance(value, list):
        raise ValueError(f"exemplars must be a list of {{prompt, response}} objects, got {type(value).__name__}")
    for i, example in enumerate(value):
        if not isinstance(example, dict) or set(example) != {"prompt", "response"} or \
                not all(isinstance(example[k], str) and example[k].strip() for k in ("prompt", "response")):
            raise ValueError(f"exemplar {i} must be an object with exactly a non-empty string prompt and response, "
                             f"got {str(example)[:120]!r}")
    return [{"prompt": e["prompt"], "response": e["response"]} for e in value]


def _flat(exemplars: list[dict]) -> list[str]:
    return [text for e in exemplars for text in (e["prompt"], e["response"])]


def _demonstration(record: dict, ctx: dict, require_answer: bool = True) -> dict:
    """One raw record in any supported shape -> the normalised demonstration row."""
    answer = None
    response_field = "response"
    if "messages" in record or "conversations" in record:
        response_field = "messages" if "messages" in record else "conversations"
        system, exemplars, prompt, response = _chat(record[response_field], ctx, response_field)
        record = {**record, "prompt": prompt, "response": response, "system": system or record.get("system"),
                  "exemplars": exemplars}
    elif isinstance(record.get("prompt"), list) or isinstance(record.get("completion"), list):
        # TRL's conversational prompt-completion: {prompt: [messages], completion: [messages]}
        response_field = "completion"
        messages = [*_messages(record.get("prompt"), "prompt", ctx),
                    *_messages(record.get("completion"), "completion", ctx)]
        system, exemplars, prompt, response = _chat(messages, ctx, "completion")
        record = {**record, "prompt": prompt, "response": response, "system": system or record.get("system"),
                  "exemplars": exemplars}
    elif "problem" in record and "solution" in record and "prompt" not in record:  # MATH / NuminaMath
        response_field = "solution"
        record = {**record, "prompt": record["problem"], "response": record["solution"]}
    elif "question" in record and "prompt" not in record:  # GSM8K: the answer field is the solution
        solution = _text(record, "answer", ctx)
        answer = hashes_answer(solution)
        if answer is None:
            raise DataError("GSM8K-style answer without a final '#### N'", field="answer", kind="malformed", **ctx)
        answer = answer.replace(",", "")  # GSM8K writes 1,500: store the bare number
        record = {**record, "prompt": record["question"], "response": solution}
    elif "response" not in record and "completion" in record:
        response_field = "completion"
        record = {**record, "response": record["completion"]}
    prompt = _text(record, "prompt", ctx)
    response = _text(record, "response", ctx)
    system = _text(record, "system", ctx, required=False)
    exemplars = _exemplars(record, ctx)
    if answer is None:
        answer = _reference_answer(record, response, ctx, source_field=response_field, required=require_answer)
    row_id = _text(record, "id", ctx, required=False) or stable_id(system, prompt, response, *_flat(exemplars))
    return {"id": row_id, "prompt": prompt, "response": response, "answer": answer, "system": system,
            "exemplars": exemplars}


def _preference(record: dict, ctx: dict) -> dict:
    """One raw pair -> the normalised preference row. Sides are strings or conversations; a
    conversation may carry the prompt itself (TRL's implicit prompt), which both sides must share."""
    system = _text(record, "system", ctx, required=False)
    prompt = record.get("prompt")
    if any(isinstance(record.get(k), list) for k in ("prompt", "chosen", "rejected")):
        sides = {}
        for key in ("chosen", "rejected"):
            if record.get(key) is None:
                raise DataError("missing", field=key, kind="missing_field", **ctx)
            messages = _messages(prompt, "prompt", ctx) + _messages(record[key], key, ctx)
            sides[key] = _chat(messages, ctx, key)
        (system_c, turns, prompt, chosen), (system_r, turns_r, prompt_r, rejected) = sides["chosen"], sides["rejected"]
        if (system_c, turns, prompt) != (system_r, turns_r, prompt_r):
            raise DataError("chosen and rejected answer different prompts (their messages before the last "
                            "assistant message differ)", field="rejected", kind="malformed", **ctx)
        system = system_c or system
        record = {**record, "prompt": prompt, "chosen": chosen, "rejected": rejected, "exemplars": turns}
    prompt = _text(record, "prompt", ctx)
    chosen = _text(record, "chosen", ctx)
    rejected = _text(record, "rejected", ctx)
    exemplars = _exemplars(record, ctx)
    if chosen.strip() == rejected.strip():
        raise DataError("chosen and rejected are the same text, so the pair prefers nothing", field="rejected",
                        kind="same_sides", **ctx)
    # Pairs train without grading, so a pair may have no answer; where it has one, it is read by the same rules.
    answer = _reference_answer(record, chosen, ctx, source_field="chosen", required=False)
    row_id = _text(record, "id", ctx, required=False) or stable_id(system, prompt, chosen, rejected, *_flat(exemplars))
    return {"id": row_id, "prompt": prompt, "chosen": chosen, "rejected": rejected, "answer": answer, "system": system,
            "exemplars": exemplars}


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
                        limit: int | None = None, require_answer: bool = True):
    """``load_demonstrations`` that also returns the ``LoadReport`` (rows kept, skips by reason)."""
    return _read(source, lambda record, ctx: _demonstration(record, ctx, require_answer), DEMONSTRATION_COLUMNS,
                 split=split, columns=columns, on_error=on_error, limit=limit)


def load_demonstrations(source, *, split: str = "train", columns: dict | None = None, on_error: str = "raise",
                        limit: int | None = None, require_answer: bool = True):
    """Demonstrations from a file (.jsonl/.json/.parquet/.csv), a saved dataset directory, a
    ``datasets.Dataset``/``DatasetDict``, a list of dicts, or a hub dataset name, as a Dataset
    with the columns ``id, prompt, response, answer, system``.

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
    return read_demonstrations(source, split=split, columns=columns, on_error=on_error, limit=limit,
                               require_answer=require_answer)[0]


def read_preferences(source, *, split: str = "train", columns: dict | None = None, on_error: str = "raise",
                     limit: int | None = None):
    """``load_preferences`` that also returns the ``LoadReport``."""
    return _read(source, _preference, PREFERENCE_COLUMNS, split=split, columns=columns, on_error=on_error, limit=limit)


def load_preferences(source, *, split: str = "train", columns: dict | None = None, on_error: str = "raise",
                     limit: int | None = None):
    """Preference pairs ``{prompt, chosen, rejected}`` (strings or message lists) as a Dataset with
    the columns ``id, prompt, chosen, rejected, answer, system``; sources and bad-input handling as
    in ``load_demonstrations``. Without a ``prompt``, conversational sides carry it themselves
    (TRL's implicit prompt: the messages before the last assistant message, the same in both).
    The answer is the ``answer`` value, else the one the chosen side states, else empty: pairs
    are trained on, not graded."""
    return read_preferences(source, split=split, columns=columns, on_error=on_error, limit=limit)[0]


# ---------------------------------------------------------------------------------------------
# Inspecting and writing


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


def shorten(text: str, max_chars: int) -> str:
    """``text`` cut to about ``max_chars`` characters for display: its start and its end (where a
    solution states its answer), with the number of characters left out between them."""
    if len(text) <= max_chars:
        return text
    head, tail = max_chars * 2 // 3, max_chars // 3
    return f"{text[:head]} … [{len(text) - head - tail} characters left out] … {text[len(text) - tail:]}"


def preview(ds, rows: int = 3, max_chars: int = 500) -> list[dict]:
    """The first ``rows`` rows for display (``data show``), every text field ``shorten``-ed."""
    rows = ds.select(range(min(rows, len(ds)))) if isinstance(ds, datasets.Dataset) else ds[:rows]
    return [{k: shorten(v, max_chars) if isinstance(v, str) else v for k, v in row.items()} for row in rows]


def token_statistics(ds, tokenizer, *, max_length: int | None = None) -> dict:
    """Prompt/response token counts (chat template included in the prompt) as plain numbers."""

    def summary(xs: list[int]) -> dict:
        xs = sorted(xs)
        if not xs:
            return {"mean": 0.0, "median": 0, "max": 0}
        return {"mean": round(sum(xs) / len(xs), 1), "median": xs[len(xs) // 2], "max": xs[-1]}

    prompt_lens, response_lens = [], []
    for row in ds:
        enc = encode_row(tokenizer, row)
        n_prompt = sum(1 for x in enc["labels"] if x == IGNORE_INDEX)
        prompt_lens.append(n_prompt)
        response_lens.append(len(enc["labels"]) - n_prompt)
    stats = {"rows": len(prompt_lens), "prompt_tokens": summary(prompt_lens), "response_tokens": summary(response_lens),
             "total_tokens": summary([p + r for p, r in zip(prompt_lens, response_lens)])}
    if max_length is not None:
        stats["over_max_length"] = sum(p + r > max_length for p, r in zip(prompt_lens, response_lens))
    return stats


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


# ---------------------------------------------------------------------------------------------
# Training rows (moved here from train.py): tokenizing for an objective and collating its micro-batches


def tokenize_for_objective(dataset, tokenizer, *, max_length: int, pairwise: bool):
    """Add input_ids/labels (or chosen_/rejected_ versions for pairs) unless already there."""
    return tokenize_for_training(dataset, tokenizer, max_length=max_length, pairwise=pairwise)[0]


def tokenize_for_training(dataset, tokenizer, *, max_length: int, pairwise: bool) -> tuple[object, dict]:
    """``tokenize_for_objective`` and what it did to the rows: how many came in, were kept, truncated
    to ``max_length`` or skipped (with the reason). Rows that arrive tokenized are taken as they are.
    A pair where either side's prompt alone fills ``max_length`` is skipped: that side has no
    response token, so the pair compares nothing."""
    counts = {"rows": len(dataset), "kept": len(dataset), "truncated": 0, "skipped_overlong": 0,
              "skipped_prompt_too_long": 0, "max_length": max_length}
    if pairwise:
        if {"chosen_input_ids", "rejected_input_ids"} <= set(dataset.column_names):
            return dataset, counts
        missing = {"prompt", "chosen", "rejected"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"a pairwise objective needs columns prompt, chosen, rejected; missing {sorted(missing)}")

        def encode(row):
            out, cut, empty = {}, False, False
            for side in ("chosen", "rejected"):
                enc = encode_row(tokenizer, row, side)
                cut |= len(enc["input_ids"]) > max_length
                ids, labels = enc["input_ids"][:max_length], enc["labels"][:max_length]
                empty |= all(x == IGNORE_INDEX for x in labels)
                out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
            return {**out, "_cut": cut, "_empty": empty}

        encoded = dataset.map(encode, desc="tokenizing pairs")
        keep = [i for i, empty in enumerate(encoded["_empty"]) if not empty]
        counts["skipped_prompt_too_long"] = len(encoded) - len(keep)
        counts["truncated"] = sum(cut for cut, empty in zip(encoded["_cut"], encoded["_empty"]) if not empty)
        if len(keep) < len(encoded):
            encoded = encoded.select(keep)
        counts["kept"] = len(encoded)
        return encoded.remove_columns(["_cut", "_empty"]), counts
    if {"input_ids", "labels"} <= set(dataset.column_names):
        return dataset, counts
    out, report = tokenize_with_report(dataset, tokenizer, max_length=max_length)
    counts.update(kept=report.kept, truncated=report.truncated, skipped_overlong=report.skipped_overlong,
                  skipped_prompt_too_long=report.skipped_prompt_too_long)
    return out, counts


def duplicate_rows(dataset, pairwise: bool) -> int:
    """How many tokenized rows repeat an earlier row token for token (labels included)."""
    columns = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"] if pairwise \
        else ["input_ids", "labels"]
    seen, repeats = set(), 0
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=4096):
        lists = [table.column(c).combine_chunks() for c in columns]
        flat = [(x.flatten().to_numpy(), x.offsets.to_numpy() - x.offsets[0].as_py()) for x in lists]
        for i in range(table.num_rows):
            row = hashlib.sha256()
            for values, offsets in flat:
                row.update(int(offsets[i + 1] - offsets[i]).to_bytes(8, "little"))
                row.update(values[offsets[i] : offsets[i + 1]].tobytes())
            key = row.digest()
            repeats += key in seen
            seen.add(key)
    return repeats


def collate_rows(dataset, indices: list[int], pad_token_id: int, pairwise: bool, device) -> dict[str, torch.Tensor] | None:
    if not indices:
        return None
    rows = dataset.select(indices)
    if pairwise:
        flat = [{"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"]} for side in ("chosen", "rejected") for r in rows]
    else:
        flat = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    batch = collate(flat, pad_token_id)
    if pairwise and has_cached_ref_logps(dataset):
        batch["ref_logps"] = torch.tensor(list(rows["ref_chosen_logp"]) + list(rows["ref_rejected_logp"]), dtype=torch.float32)
    return {k: v.to(device) for k, v in batch.items()}


def has_cached_ref_logps(dataset) -> bool:
    """Pairs carrying the reference's summed log-probs, computed once (preference.add_reference_logps)."""
    return {"ref_chosen_logp", "ref_rejected_logp"} <= set(dataset.column_names)


def row_lengths(dataset, pairwise: bool) -> list[int]:
    if pairwise:
        return [len(c) + len(r) for c, r in zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"])]
    return [len(ids) for ids in dataset["input_ids"]]
