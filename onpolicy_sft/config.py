"""One configuration for the whole loop: plain dataclasses, YAML on disk, ``--set a.b=v`` overrides.

Every stage function takes its own section (``TrainConfig`` for ``train``, ``EvalConfig`` for
``evaluate``); ``LoopConfig`` nests them all. Defaults are the embedded CPU run; the GPU
recipes in experiments/configs/ override them with the published settings (METHODS.md).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onpolicy_sft.models import EMBEDDED_MODEL


@dataclass
class ModelConfig:
    name: str = EMBEDDED_MODEL
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on GPU
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Where the demonstrations and the evaluation sets come from.

    ``source="arithmetic"`` is the embedded generated dataset; its sizes are the n_* fields.
    Any other source goes through ``data.load_demonstrations`` and is cut to the n_* sizes.
    """

    source: str = "arithmetic"
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["test", "test_hard"])
    n_train: int = 48
    n_test: int = 64
    n_test_hard: int = 64
    n_general: int = 20  # general prompts for forgetting
    seed: int = 0


@dataclass
class ObjectiveConfig:
    name: str = "idft"
    hparams: dict[str, Any] = field(default_factory=dict)


@dataclass
class PeftConfig:
    """LoRA adapters through peft (Hu et al. 2021): ``rank`` 0 trains every weight instead.

    Only the adapters train; the lm_head stays frozen unless it is in ``target_modules``.
    Checkpoints hold the adapter (``adapter/``) and the merged model, which is what later stages load.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self):
        if self.rank < 0 or not self.alpha > 0 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ValueError(
                f"train.peft: need rank >= 0, alpha > 0, 0 <= dropout < 1 and some target_modules; got rank "
                f"{self.rank}, alpha {self.alpha}, dropout {self.dropout}, target_modules {self.target_modules}"
            )


@dataclass
class TrainConfig:
    """Optimisation settings. ``batch_size`` counts sequences (or pairs) per optimizer step over all
    processes; ``micro_batch_size`` is what one process runs per forward. The defaults of the
    optimiser and schedule are the published ones (AdamW 0.9/0.95, wd 0.01, 10% warmup, cosine, clip 1)."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lr: float = 5e-5
    batch_size: int = 8
    micro_batch_size: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    max_length: int = 512
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on GPU, none on CPU; or "no" | "bf16" | "fp16"
    group_by_length: bool = True
    fused: bool = True
    gradient_checkpointing: bool = False
    packing: bool = False  # padding-free micro-batches (onpolicy_sft.packing); needs the fused path
    fsdp: bool = False  # shard the model with FSDP2 over all processes (onpolicy_sft.fsdp)
    peft: PeftConfig = field(default_factory=PeftConfig)
    teacher: str | None = None  # model path/name; "base" = the frozen starting model
    ref: str | None = None  # idem; objectives that need one default to "base"
    save_every: int = 50  # resumable state every N optimizer steps (0: never, only the final weights)
    log_every: int = 1
    trackers: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])
    progress: bool = True

    def __post_init__(self):
        if self.packing and not self.fused:
            raise ValueError("train.packing needs the fused path: set train.fused: true or train.packing: false")
        if self.fsdp and self.peft.rank:
            raise ValueError("train.fsdp with LoRA (train.peft.rank > 0) is not supported; LoRA models are small "
                             "enough to train data-parallel: set train.fsdp: false")
        if self.peft.rank and self.fused and "lm_head" in self.peft.target_modules and self.peft.dropout:
            raise ValueError("train.peft: LoRA dropout on lm_head is not applied by the fused path (it works from the "
                             "merged head weight); set train.peft.dropout: 0 or leave lm_head out of target_modules")


@dataclass
class EvalConfig:
    """Greedy accuracy always; avg@k and pass@k when ``n_samples`` > 0 (papers: 16 samples, T = 1)."""

    backend: str = "hf"  # "hf" | "vllm"
    max_new_tokens: int = 256
    n_samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    pass_k: list[int] = field(default_factory=lambda: [1])
    seed: int = 0
    batch_size: int = 16
    forgetting_max_new_tokens: int = 96


@dataclass
class LoopConfig:
    out_dir: str = "runs/cpu_default"
    rounds: int = 2
    backend: str = "vllm"  # generation backend of every stage; falls back to hf where vLLM is missing
    eval_base: bool = True  # evaluate the starting model as round 0 of the table
    score_original: bool = True  # DDT-score the original corpus each round, for the report
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewrite: dict[str, Any] = field(default_factory=dict)  # fields of decoding.rewrite.RewriteConfig
    backend_options: dict[str, Any] = field(default_factory=dict)  # passed to decoding.make_backend
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def from_dict(cls, values: dict[str, Any], where: str = "config"):
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys with the valid choices."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value, hint, where: str):
    """Check a YAML scalar/list against a field's annotation; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any or not isinstance(hint, type):
        return value  # annotations we cannot check (Literal, Callable, ...) are left to the dataclass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-5" as a string
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(config, overrides: list[str]):
    """A copy of ``config`` with ``section.key=value`` overrides; values are parsed as YAML."""
    values = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-5)")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = values
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                raise ValueError(f"override {item!r}: {'.'.join(keys[: depth + 1])} is not a section")
            node = node[key]
        node[keys[-1]] = yaml.safe_load(raw)
    return from_dict(type(config), values, where="overrides")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls=LoopConfig):
    """``cls`` from a YAML file (missing keys keep their defaults), then the overrides."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
    config = from_dict(cls, values, where=str(path or "config"))
    return apply_overrides(config, overrides or [])


def save_config(config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
