"""How a row becomes token ids: the model's own chat template around the prompt, the response
after it with response-only labels, and padding into batches.

The prompt is rendered with the model's chat template (system turn, exemplar turns, question) and
the response tokens follow plus the end-of-turn token, so that the model learns to stop; only
those tokens carry labels. Every stage renders a row's prompt through ``encode_row_prompt``.
"""

from __future__ import annotations

import weakref

import torch

from onpolicy_sft.ops import IGNORE_INDEX


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
