"""The normalised rows, and every supported shape of a record read into them.

Demonstrations have the columns ``id, prompt, response, answer, system, exemplars``; preference
pairs ``id, prompt, chosen, rejected, answer, system, exemplars``, whatever shape the record came
in (plain fields, chat messages, TRL's conversational formats, GSM8K, MATH). A bad field is a
``DataError`` naming the record's source, place and field.
"""

from __future__ import annotations

import hashlib
import json

import datasets

from onpolicy_sft.grading import extract_answer, hashes_answer
from onpolicy_sft.sources import DataError


DEMONSTRATION_COLUMNS = ("id", "prompt", "response", "answer", "system", "exemplars")
PREFERENCE_COLUMNS = ("id", "prompt", "chosen", "rejected", "answer", "system", "exemplars")
# Worked examples rendered as earlier chat turns before the row's prompt (``encoding.chat_messages``).
EXEMPLARS = datasets.List({"prompt": datasets.Value("string"), "response": datasets.Value("string")})


def columns_features(names) -> datasets.Features:
    """The schema of normalised rows: every column a string but ``exemplars``."""
    return datasets.Features({k: EXEMPLARS if k == "exemplars" else datasets.Value("string") for k in names})


def stable_id(*parts: str) -> str:
    """Content hash of a row, so that the same row has the same id in every run and format."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()[:16]


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


def demonstration_row(record: dict, ctx: dict, require_answer: bool = True) -> dict:
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


def preference_row(record: dict, ctx: dict) -> dict:
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
