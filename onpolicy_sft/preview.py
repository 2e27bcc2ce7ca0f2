"""What ``data show`` prints: the first rows with long texts shortened, and token counts."""

from __future__ import annotations

import datasets

from onpolicy_sft.encoding import encode_row
from onpolicy_sft.ops import IGNORE_INDEX


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
