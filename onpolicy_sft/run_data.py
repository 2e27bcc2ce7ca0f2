"""The data a run reads: its training demonstrations, its evaluation sets and the general prompts
forgetting is measured on, as the config's data section names them; and the columns of a corpus
that training takes.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from onpolicy_sft import arith
from onpolicy_sft.config import DataConfig
from onpolicy_sft.loaders import read_demonstrations
from onpolicy_sft.exemplars import resolve as resolve_exemplars
from onpolicy_sft.exemplars import with_exemplars

# response_truncated keeps a cut-off response from being trained with an end-of-turn token the model never wrote.
TRAINING_COLUMNS = ("id", "prompt", "response", "answer", "system", "exemplars", "response_truncated")


@dataclass
class RunData:
    """What a run reads: the training demonstrations, the evaluation sets by name, the general
    prompts for forgetting, and notes on how they were made (held-out carving, skipped rows)."""

    train: datasets.Dataset
    evals: dict[str, datasets.Dataset]
    general: list[str]
    notes: list[str] = field(default_factory=list)

    def digest(self) -> str:
        """A hash of every row a run reads, for its fingerprint."""
        h = hashlib.sha256()
        for name, ds in [("train", self.train), *sorted(self.evals.items())]:
            h.update(name.encode())
            for row in ds.select_columns([c for c in TRAINING_COLUMNS if c in ds.column_names]):
                h.update(json.dumps(row, sort_keys=True).encode())
        h.update(json.dumps(self.general).encode())
        return h.hexdigest()[:16]


def _read(source: str, split: str, config: DataConfig, notes: list[str]) -> datasets.Dataset:
    dataset, report = read_demonstrations(source, split=split, columns=config.columns or None, on_error=config.on_error)
    if report.n_skipped:
        notes.append(f"{report.source}: skipped {report.n_skipped} rows ({dict(report.skipped)}); kept {report.kept}")
    return dataset


def load_data(config: DataConfig) -> RunData:
    """The training demonstrations and evaluation sets ``config`` names, each cut to its size.

    A file source has no splits, so its evaluation sets must be named (``eval_sources``) or carved
    off it (``holdout``); evaluating on the training file is refused, as is any evaluation row whose
    prompt is also a training prompt.
    """
    notes: list[str] = []
    sizes = {"test": config.n_test, "test_hard": config.n_test_hard}
    if config.source == "arithmetic":
        unknown = sorted(set(config.eval_splits) - {"train", "test", "test_hard"})
        if unknown:
            raise ValueError(f"data.eval_splits: the arithmetic dataset has splits train, test, test_hard; not {unknown}")
        splits = arith.arithmetic_splits(seed=config.seed, n_train=config.n_train, n_test=config.n_test,
                                         n_test_hard=config.n_test_hard)
        train_set, evals = splits[config.train_split], {s: splits[s] for s in config.eval_splits}
    else:
        train_set = _read(config.source, config.train_split, config, notes)
        if config.eval_sources:
            evals = {name: _read(path, name, config, notes) for name, path in config.eval_sources.items()}
        elif config.holdout:
            if config.holdout >= len(train_set):
                raise ValueError(f"data.holdout: {config.holdout} rows would leave nothing of {config.source} "
                                 f"({len(train_set)} rows) to train on")
            order = list(range(len(train_set)))
            random.Random(config.seed).shuffle(order)
            held, kept = sorted(order[: config.holdout]), sorted(order[config.holdout:])
            evals = {"heldout": train_set.select(held)}
            train_set = train_set.select(kept)
            notes.append(f"evaluation set 'heldout': {len(held)} rows carved off {config.source} (seeded draw, "
                         f"data.seed {config.seed}); training uses the other {len(kept)}")
        elif Path(config.source).exists():
            raise ValueError(
                f"data.source: {config.source} is a file, which has no splits, so there is nothing to evaluate on "
                "but the training rows: name the evaluation sets (data.eval_sources: {test: FILE}) or carve a "
                "held-out set off the file (data.holdout: N)"
            )
        else:
            evals = {s: _read(config.source, s, config, notes) for s in config.eval_splits}
    train_set = train_set.select(range(min(config.n_train, len(train_set))))
    evals = {s: d.select(range(min(sizes.get(s, config.n_test), len(d)))) for s, d in evals.items()}
    _refuse_overlap(train_set, evals, config)
    turns = resolve_exemplars(config.exemplars, source=config.source, pool=config.exemplar_pool, seed=config.seed)
    train_set = with_exemplars(train_set, turns)
    evals = {s: with_exemplars(d, turns) for s, d in evals.items()}
    general = arith.general_prompts()[: config.n_general]
    return RunData(train_set, evals, general, notes)


def _refuse_overlap(train_set, evals: dict, config: DataConfig) -> None:
    seen = {p.strip() for p in train_set["prompt"]}
    for name, ds in evals.items():
        shared = [p for p in ds["prompt"] if p.strip() in seen]
        if shared:
            where = config.eval_sources.get(name, f"{config.source} split {name!r}")
            raise ValueError(
                f"data: {len(shared)} of the {len(ds)} rows of evaluation set {name!r} ({where}) have a prompt that "
                f"is also in the training data ({config.source}), e.g. {shared[0][:80]!r}; a score on training rows "
                "means nothing: remove them from one side"
            )


def training_rows(corpus: datasets.Dataset) -> datasets.Dataset:
    return corpus.select_columns([c for c in TRAINING_COLUMNS if c in corpus.column_names])

