"""Training rows: a dataset tokenized for an objective (response-only labels; chosen and rejected
sides for a pairwise one), counted as it is cut to ``max_length``, and its micro-batches collated."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from onpolicy_sft.encoding import collate, encode_row
from onpolicy_sft.ops import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class TokenizeReport:
    """What ``tokenize_with_report`` did with rows longer than ``max_length``."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped_overlong: int = 0
    skipped_prompt_too_long: int = 0  # no room for a single response token: nothing to learn from


def tokenize_with_report(ds, tokenizer, *, max_length: int, overlong: str = "truncate"):
    """The dataset with ``input_ids``/``labels`` (response-only) added to every row, and its
    ``TokenizeReport``. Over-long rows are truncated or skipped by ``overlong`` and counted in the log
    either way. A row whose prompt alone reaches ``max_length`` is always skipped (and counted): it
    would carry no label. A true ``response_truncated`` marks a response cut off at a generation
    limit (``encode_row``)."""
    if overlong not in ("truncate", "skip"):
        raise ValueError(f"overlong must be 'truncate' or 'skip', not {overlong!r}")
    missing = {"prompt", "response"} - set(ds.column_names)
    if missing:
        raise ValueError(f"tokenize_with_report needs columns prompt and response; missing {sorted(missing)}")

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


def tokenize_for_training(dataset, tokenizer, *, max_length: int, pairwise: bool) -> tuple[object, dict]:
    """``dataset`` with input_ids/labels added (chosen_/rejected_ versions for pairs), and what that did
    to the rows: how many came in, were kept, truncated to ``max_length`` or skipped (with the
    reason). Rows that arrive tokenized are taken as they are. A pair where either side's prompt
    alone fills ``max_length`` is skipped: that side has no response token, so the pair compares
    nothing."""
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
