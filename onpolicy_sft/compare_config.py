"""What a comparison is (onpolicy_sft/compare.py): its methods, each an objective and the corpus it
trains on, and its config, checked completely when it loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from onpolicy_sft.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, check_run, check_seed, objective_hparams
from onpolicy_sft.config_io import from_dict, to_dict
from onpolicy_sft.rewrite_config import RewriteConfig

# method -> (objective name, training corpus)
METHODS: dict[str, tuple[str, str] | None] = {
    "base": None,
    "sft": ("sft", "original"),
    "dft": ("dft", "original"),
    "target_sft": ("target_sft", "original"),
    "idft": ("idft", "original"),
    "hd_sft": ("sft", "hinted"),
    "hd_idft": ("idft", "hinted"),
    "dpo": ("dpo", "pairs"),
    "simpo": ("simpo", "pairs"),
}


@dataclass
class PairsConfig:
    """DPO@k / SimPO@k pair building (onpolicy_sft.preference_pairs.build_pairs)."""

    k: int = 4
    no_pair: str = "demonstration"  # or "drop"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class CompareConfig:
    """The comparison; ``backend``/``backend_options`` as in ``LoopConfig``. ``hparams`` gives a
    method's objective hyperparameters and ``train_overrides`` the ``train`` fields that differ for
    it; both are checked (and numbers typed) when the config loads."""

    out_dir: str = "runs/compare_cpu"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    backend: str = "hf"  # generation backend of every stage ("hf" | "vllm"; vllm falls back to hf)
    backend_options: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # the shared budget
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> objective hyperparameters
    # method -> TrainConfig fields that differ for it; Target-SFT's teacher is the frozen base model
    train_overrides: dict[str, dict[str, Any]] = field(default_factory=lambda: {"target_sft": {"teacher": "base"}})
    eval: EvalConfig = field(default_factory=EvalConfig)
    keep_checkpoints: bool = False  # False: delete each cell's weights once it is evaluated

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: unknown method(s) {unknown}; valid methods: {list(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds: list at least one seed")
        for seed in self.seeds:
            check_seed(seed, "seeds")  # each becomes train.seed of its cells, checked only then otherwise
        for where, table in (("hparams", self.hparams), ("train_overrides", self.train_overrides)):
            bad = sorted(set(table) - {m for m, spec in METHODS.items() if spec})
            if bad:
                raise ValueError(f"{where}: unknown method(s) {bad}; valid methods: {list(METHODS)[1:]}")
        for method, values in self.hparams.items():
            try:
                self.hparams[method] = objective_hparams(METHODS[method][0], values)
            except ValueError as err:
                raise ValueError(f"hparams.{method}: {err}") from None
        for method, values in self.train_overrides.items():
            if "objective" in values:
                raise ValueError(f"train_overrides.{method}.objective: the method names its objective; "
                                 f"set its hyperparameters under hparams.{method}")
            merged = from_dict(TrainConfig, {**_shallow(self.train), **values}, where=f"train_overrides.{method}")
            self.train_overrides[method] = {key: getattr(merged, key) for key in values}
        check_run(self)


def _shallow(config) -> dict:
    return {f.name: to_dict(getattr(config, f.name)) if dataclasses.is_dataclass(getattr(config, f.name))
            else getattr(config, f.name) for f in dataclasses.fields(config)}
