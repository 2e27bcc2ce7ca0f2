"""The rows a training run trains on: tokenized for its objective (response-only labels; chosen and
rejected sides for a pairwise one; counted as they are cut to ``max_length``), and planned into
optimizer steps, offline from one dataset or online, block by block, from rows made as training
reaches them.

The rows of an optimizer step are fixed by the seed alone (``plan_steps``); only how they are
split into micro-batches depends on the micro-batch size and the number of processes. That is
what makes 1×8 and 4×2 the same update, and what lets a resumed run replay the same data.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from onpolicy_sft.config import TrainConfig
from onpolicy_sft.encoding import collate, encode_row
from onpolicy_sft.objectives import Objective
from onpolicy_sft.ops import IGNORE_INDEX

logger = logging.getLogger(__name__)


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
    logger.info("tokenized %d rows (max_length %d): kept %d, truncated %d, skipped %d overlong and %d whose prompt "
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


def plan_steps(
    lengths: list[int],
    *,
    batch_size: int,
    micro_batch_size: int,
    num_processes: int = 1,
    epochs: float = 1.0,
    seed: int = 0,
    group_by_length: bool = True,
    rows: int | None = None,
) -> list[list[list[list[int]]]]:
    """``steps[s][p]`` = the micro-batches (lists of row indices) process ``p`` runs at step ``s``.

    Rows are shuffled per epoch with ``seed`` and cut into steps of ``batch_size`` rows; ``rows``,
    when given, is how many rows are trained on in all (epochs as needed), else epochs × n. Within a
    step, rows are sorted by length (so micro-batches need little padding) and split into
    equal numbers of micro-batches per process; a micro-batch can be empty when the last step
    has fewer rows than processes, and then contributes nothing.
    """
    if batch_size < 1 or micro_batch_size < 1 or num_processes < 1:
        raise ValueError(
            f"batch_size ({batch_size}), micro_batch_size ({micro_batch_size}) and the number of "
            f"processes ({num_processes}) must all be positive"
        )
    n = len(lengths)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    total = rows if rows is not None else max(1, round(epochs * n))
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        generator = torch.Generator().manual_seed(seed + epoch)
        order.extend(torch.randperm(n, generator=generator).tolist())
        epoch += 1
    order = order[:total]
    steps = []
    for start in range(0, total, batch_size):
        rows = order[start : start + batch_size]
        if group_by_length:
            rows = sorted(rows, key=lambda i: (-lengths[i], i))
        per_process = math.ceil(len(rows) / (micro_batch_size * num_processes))
        chunks = _split_even(rows, per_process * num_processes)
        steps.append([chunks[p::num_processes] for p in range(num_processes)])
    return steps


def _split_even(rows: list[int], parts: int) -> list[list[int]]:
    base, extra = divmod(len(rows), parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(rows[start : start + size])
        start += size
    return out


@dataclass
class TrainData:
    """The tokenized rows, the plan of which rows every process runs at every step, and the
    record of what tokenizing did to the rows."""

    dataset: object  # datasets.Dataset with input_ids/labels (or chosen_/rejected_ versions)
    plan: list[list[list[list[int]]]]  # plan_steps' steps[s][p] = micro-batches of row indices
    pairwise: bool
    pad_token_id: int
    record: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return len(self.plan)

    def micro_batches(self, step: int, process_index: int, device) -> list[dict[str, torch.Tensor] | None]:
        return [collate_rows(self.dataset, rows, self.pad_token_id, self.pairwise, device)
                for rows in self.plan[step][process_index]]

    def filler(self, step: int, device) -> dict[str, torch.Tensor]:
        """One row of the step, for a process whose share of it is empty (run with weight 0)."""
        first = next(rows for process in self.plan[step] for rows in process if rows)
        return collate_rows(self.dataset, first[:1], self.pad_token_id, self.pairwise, device)


def setup_data(dataset, tokenizer, objective: Objective, config: TrainConfig, num_processes: int) -> TrainData:
    """Tokenize, count what was truncated, skipped or repeated (a WARNING when any), and plan the steps."""
    pairwise = bool(objective.pairwise)
    dataset, record = tokenize_for_training(dataset, tokenizer, max_length=config.max_length, pairwise=pairwise)
    if len(dataset) == 0:
        raise ValueError(f"no training row is left after tokenizing ({record['rows']} rows in, "
                         f"{record['skipped_prompt_too_long']} with a prompt that fills train.max_length "
                         f"({config.max_length}), {record['skipped_overlong']} over it)")
    record["duplicates"] = duplicate_rows(dataset, pairwise)
    changed = {k: record[k] for k in ("truncated", "skipped_overlong", "skipped_prompt_too_long", "duplicates")
               if record[k]}
    if changed:
        logger.warning("training rows: %d in, %d kept; %s (max_length %d)", record["rows"], record["kept"],
                       ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in changed.items()), config.max_length)
    plan = plan_steps(
        row_lengths(dataset, pairwise),
        batch_size=config.batch_size,
        micro_batch_size=config.micro_batch_size,
        num_processes=num_processes,
        epochs=config.epochs,
        seed=config.seed,
        group_by_length=config.group_by_length,
        rows=config.rows,
    )
    if config.max_steps is not None:
        plan = plan[: config.max_steps]
    record["steps"] = len(plan)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TrainData(dataset=dataset, plan=plan, pairwise=pairwise, pad_token_id=pad_id, record=record)


@dataclass
class Blocks:
    """Online training: the rows of steps [b·steps, (b+1)·steps) are ``rows(b, model)``, asked for
    when step b·steps is reached, with the model as trained so far. ``settings`` (what decides those
    rows besides the weights) join the run's fingerprint."""

    steps: int
    rows: Callable[[int, nn.Module], object]
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"Blocks.steps: must be an integer >= 1, got {self.steps!r}")


class BlockData:
    """TrainData's interface over blocks of rows that only exist once training reaches them.

    The whole run (its steps, hence the schedule, and its rows in all) is planned on ``whole``, the
    dataset the blocks stand in for; block b trains its share of those rows on its own rows, planned
    as a run of its own with seed + b. With one block covering every step this is ``whole``'s plan
    on the block's rows: online training with one block is offline training."""

    def __init__(self, whole: TrainData, blocks: Blocks, model, tokenizer, objective: Objective,
                 config: TrainConfig, num_processes: int):
        self.dataset, self.pairwise, self.record = whole.dataset, whole.pairwise, whole.record
        self.total_steps = whole.total_steps
        self.total_rows = sum(len(rows) for step in whole.plan for process in step for rows in process)
        self.blocks, self.model, self.tokenizer, self.objective = blocks, model, tokenizer, objective
        self.config, self.num_processes = config, num_processes
        self.index, self.block = None, None

    def _at(self, step: int) -> tuple[TrainData, int]:
        index, offset = divmod(step, self.blocks.steps)
        if index != self.index:
            self.block, self.index = self._plan_block(index), index
        return self.block, offset

    def _plan_block(self, index: int) -> TrainData:
        first = index * self.blocks.steps
        steps = min(self.blocks.steps, self.total_steps - first)
        rows = min(steps * self.config.batch_size, self.total_rows - first * self.config.batch_size)
        block_config = replace(self.config, rows=rows, max_steps=steps, seed=self.config.seed + index)
        dataset = self.blocks.rows(index, self.model)
        return setup_data(dataset, self.tokenizer, self.objective, block_config, self.num_processes)

    def micro_batches(self, step: int, process_index: int, device) -> list[dict[str, torch.Tensor] | None]:
        block, offset = self._at(step)
        return block.micro_batches(offset, process_index, device)

    def filler(self, step: int, device) -> dict[str, torch.Tensor]:
        block, offset = self._at(step)
        return block.filler(offset, device)

