"""One configuration for the whole loop: plain dataclasses, read from YAML with ``--set a.b=v``
overrides (``load_config``; the machinery, and writing them back, in ``config_io``).

Every stage function takes its own section (``TrainConfig`` for ``train``, ``EvalConfig`` for
``evaluate``, ``rewrite_config.RewriteConfig`` for the rewrite); ``LoopConfig`` nests them all.
A config is checked completely when it is loaded, before any model loads: every key, every type,
every objective and its hyperparameters, the backend's options. The first bad value stops the load
with its place, e.g. ``loop.yaml: rewrite.hinted.beta: expected float, got 'x'``.

Defaults are the embedded CPU run; the GPU recipes in experiments/configs/ override them with the
published settings (docs/methods.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decoding.hf import HFBackend
from decoding.vllm_backend import VLLMBackend
from onpolicy_sft import objectives
from onpolicy_sft.config_io import ConfigError, apply_overrides, coerce, from_dict, read_yaml
from onpolicy_sft.loaders import check_columns
from onpolicy_sft.exemplars import resolve as resolve_exemplars
from onpolicy_sft.models import EMBEDDED_MODEL
from onpolicy_sft.rewrite_config import RewriteConfig

BACKENDS = {"hf": HFBackend, "vllm": VLLMBackend}
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit, and accelerate's set_seed seeds numpy too
# accelerate's trackers by name, and a module that each needs: without it accelerate drops the
# tracker without a word, so a run would log nothing where it was asked to.
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
                   "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                   "trackio": "trackio"}


def _require(ok: bool, field_name: str, need: str, value) -> None:
    """A section's own check; the message starts with the field so that ``from_dict`` reports it
    at its dotted path (``train.lr: ...``)."""
    if not ok:
        raise ValueError(f"{field_name}: {need}, got {value!r}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_seed(value, field_name: str = "seed") -> None:
    _require(isinstance(value, int) and 0 <= value <= MAX_SEED, field_name, f"must be an integer in [0, {MAX_SEED}]",
             value)


@dataclass
class ModelConfig:
    name: str = EMBEDDED_MODEL
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on GPU
    trust_remote_code: bool = False

    def load_options(self, device=None) -> dict:
        """``models.load_model``'s keyword arguments for this model (on ``device`` where one is named)."""
        options = {"dtype": self.dtype, "trust_remote_code": self.trust_remote_code}
        return options if device is None else {**options, "device": device}


@dataclass
class DataConfig:
    """Where the demonstrations and the evaluation sets come from.

    ``source="arithmetic"`` is the embedded generated dataset, with the splits ``eval_splits``
    names. A file has no splits: its evaluation sets are named files, ``eval_sources: {test:
    test.jsonl}``, or ``holdout: N`` carves N rows off the training file (a seeded draw, said in
    the log and the run's record). A hub dataset with splits uses ``eval_splits``. Rows that are in
    both the training data and an evaluation set are refused. Every set is cut to the n_* sizes
    (``n_test`` for evaluation sets other than test_hard). ``columns`` and ``on_error`` are as in
    ``loaders.read_demonstrations``. ``exemplars`` are the worked examples every prompt of the training
    and evaluation sets is shown first, as earlier chat turns (``onpolicy_sft.exemplars``).
    """

    source: str = "arithmetic"
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["test", "test_hard"])
    eval_sources: dict[str, str] = field(default_factory=dict)
    holdout: int = 0
    columns: dict[str, str] = field(default_factory=dict)
    on_error: str = "raise"
    n_train: int = 48
    n_test: int = 64
    n_test_hard: int = 64
    n_general: int = 20  # general prompts for forgetting
    seed: int = 0
    # Worked examples rendered as earlier chat turns before every question (onpolicy_sft.exemplars):
    # unset = the source's default, 0 = none, n = drawn from exemplar_pool, or a list / file of them.
    exemplars: int | str | list[dict[str, str]] | None = None
    exemplar_pool: str = ""

    def __post_init__(self):
        if self.exemplar_pool and not Path(self.exemplar_pool).is_file():
            raise ValueError(f"exemplar_pool: no file {self.exemplar_pool}")
        resolve_exemplars(self.exemplars, source=self.source, pool=self.exemplar_pool, seed=self.seed)
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")
        if self.holdout and self.eval_sources:
            raise ValueError("set eval_sources or holdout, not both")
        for name in ("n_train", "n_test", "n_test_hard", "n_general"):
            _require(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        check_seed(self.seed)
        try:
            check_columns(self.columns)
        except ValueError as err:
            raise ValueError(f"columns: {err}") from None

    @property
    def eval_names(self) -> list[str]:
        """The evaluation sets' names, in table order."""
        if self.source != "arithmetic" and self.eval_sources:
            return list(self.eval_sources)
        if self.source != "arithmetic" and self.holdout:
            return ["heldout"]
        return list(self.eval_splits)


@dataclass
class ObjectiveConfig:
    """An objective by name with its hyperparameters, built once when the config loads so that a
    wrong name or value fails then; numbers written as strings ("1e-5") are read as numbers."""

    name: str = "idft"
    hparams: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.hparams = objective_hparams(self.name, self.hparams)


def objective_hparams(name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` coerced to the types of ``name``'s factory and checked by building it."""
    factory = objectives.OBJECTIVES[name][0] if name in objectives.OBJECTIVES else None
    if factory is None:
        objectives.build(name)  # raises, naming the valid objectives
    hints = typing.get_type_hints(factory)
    hints["chunk_tokens"] = int
    coerced = {}
    for key, value in hparams.items():
        coerced[key] = coerce(value, hints[key], f"hparams.{key}") if key in hints else value
    objectives.build(name, **coerced)
    return coerced


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
    optimiser and schedule are the published ones (AdamW 0.9/0.95, wd 0.01, 10% warmup, cosine, clip 1).
    ``rows``, when set, is the training budget in rows (sequences, or pairs) in place of ``epochs``:
    the same number of optimizer steps whatever the corpus size, so that arms whose corpora differ
    (``rewrite.keep_verified`` > 1) stay comparable."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lr: float = 5e-5
    batch_size: int = 8
    micro_batch_size: int = 4
    epochs: float = 1.0
    rows: int | None = None
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
        check_train(self)
        if self.rows is not None and self.rows < 1:
            raise ValueError(f"rows: must be >= 1 or null (then epochs decides), got {self.rows}")
        if self.packing and not self.fused:
            raise ValueError("train.packing needs the fused path: set train.fused: true or train.packing: false")
        if self.fsdp and self.peft.rank:
            raise ValueError("train.fsdp with LoRA (train.peft.rank > 0) is not supported; LoRA models are small "
                             "enough to train data-parallel: set train.fsdp: false")
        if self.peft.rank and self.fused and "lm_head" in self.peft.target_modules and self.peft.dropout:
            raise ValueError("train.peft: LoRA dropout on lm_head is not applied by the fused path (it works from the "
                             "merged head weight); set train.peft.dropout: 0 or leave lm_head out of target_modules")


def check_train(config: TrainConfig) -> None:
    """Every optimisation value in range, so that a bad one stops the config load with its field
    instead of failing (or, worse, training on NaN) once the models are loaded."""
    ints = {"batch_size": 1, "micro_batch_size": 1, "max_length": 2, "save_every": 0, "log_every": 1}
    for name, low in ints.items():
        _require(getattr(config, name) >= low, name, f"must be >= {low}", getattr(config, name))
    _require(config.max_steps is None or config.max_steps >= 1, "max_steps", "must be >= 1 or null", config.max_steps)
    _require(_finite(config.lr) and config.lr > 0, "lr", "must be a finite number > 0", config.lr)
    _require(_finite(config.epochs) and config.epochs > 0, "epochs",
             "must be a finite number > 0 (to skip training, leave the stage out)", config.epochs)
    _require(_finite(config.warmup_ratio) and 0 <= config.warmup_ratio <= 1, "warmup_ratio", "must be in [0, 1]",
             config.warmup_ratio)
    _require(_finite(config.min_lr_ratio) and 0 <= config.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]",
             config.min_lr_ratio)
    _require(_finite(config.weight_decay) and config.weight_decay >= 0, "weight_decay", "must be a finite number >= 0",
             config.weight_decay)
    _require(len(config.adam_betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in config.adam_betas),
             "adam_betas", "must be two numbers in [0, 1), e.g. [0.9, 0.95]", config.adam_betas)
    _require(_finite(config.adam_eps) and config.adam_eps > 0, "adam_eps", "must be a finite number > 0",
             config.adam_eps)
    _require(config.max_grad_norm is None or (_finite(config.max_grad_norm) and config.max_grad_norm > 0),
             "max_grad_norm", "must be a finite number > 0 or null", config.max_grad_norm)
    _require(config.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision",
             "must be auto, no, bf16 or fp16", config.mixed_precision)
    check_seed(config.seed)
    for name in config.trackers:
        _require(name == "jsonl" or name in TRACKER_MODULES, "trackers",
                 f"{name!r} is not a tracker; choose from {sorted(['jsonl', *TRACKER_MODULES])}", config.trackers)
        if name in TRACKER_MODULES and importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise ValueError(f"trackers: {name!r} is not installed here (pip install {TRACKER_MODULES[name]}), "
                             f"so it would log nothing; install it or remove it from train.trackers")


@dataclass
class EvalConfig:
    """Greedy accuracy always; avg@k and pass@k when ``n_samples`` > 0 (papers: 16 samples, T = 1)."""

    max_new_tokens: int = 256
    n_samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    pass_k: list[int] = field(default_factory=lambda: [1])
    seed: int = 0
    forgetting_max_new_tokens: int = 96

    def __post_init__(self):
        for name in ("max_new_tokens", "forgetting_max_new_tokens"):
            _require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        _require(self.n_samples >= 0, "n_samples", "must be >= 0", self.n_samples)
        _require(_finite(self.temperature) and self.temperature >= 0, "temperature", "must be a finite number >= 0",
                 self.temperature)
        _require(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _require(bool(self.pass_k) and all(k >= 1 for k in self.pass_k), "pass_k", "must be a list of k >= 1",
                 self.pass_k)
        # pass@k needs k samples per problem: a larger k would drop out of the table without a word.
        for k in self.pass_k:
            if self.n_samples and k > self.n_samples:
                raise ValueError(f"pass_k: pass@{k} needs eval.n_samples >= {k}, but n_samples is {self.n_samples}")
        check_seed(self.seed)


@dataclass
class BaselineConfig:
    """The loop's baseline arm: from the same starting model with the same train settings (hence the
    same optimizer steps), the objective on the ORIGINAL demonstrations, evaluated every round."""

    enabled: bool = True
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(name="sft"))


@dataclass
class OnlineConfig:
    """Online mode of the loop's on-policy arm (docs/methods.md §6): before every
    ``steps_per_rewrite`` optimizer steps the next ``rows_per_rewrite`` rows of the corpus (in its
    order, wrapping round) are rewritten by the weights about to train on them. Both 0: off, the
    corpus is rewritten once per round."""

    steps_per_rewrite: int = 0
    rows_per_rewrite: int = 0

    def __post_init__(self):
        for name in ("steps_per_rewrite", "rows_per_rewrite"):
            _require(getattr(self, name) >= 0, name, "must be >= 0 (0 and 0: online mode off)", getattr(self, name))
        if (self.steps_per_rewrite == 0) != (self.rows_per_rewrite == 0):
            raise ValueError(f"steps_per_rewrite: set both steps_per_rewrite and rows_per_rewrite (online mode) or "
                             f"neither, got {self.steps_per_rewrite} and {self.rows_per_rewrite}")

    @property
    def enabled(self) -> bool:
        return self.steps_per_rewrite > 0


@dataclass
class LoopConfig:
    """The loop. ``backend`` is the one generation backend of every stage (rewrite, evaluation,
    forgetting); ``backend_options`` are keyword options of that backend's class (decoding.hf.HFBackend,
    decoding.vllm_backend.VLLMBackend), checked against it: an option of the other backend is refused."""

    out_dir: str = "runs/cpu_default"
    rounds: int = 2
    backend: str = "vllm"  # falls back to hf where vLLM cannot start (said in the log and the summary)
    backend_options: dict[str, Any] = field(default_factory=dict)
    eval_base: bool = True  # evaluate the starting model as round 0 of the table
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self):
        _require(self.rounds >= 0, "rounds", "must be >= 0", self.rounds)
        check_run(self)
        if isinstance(self.online, dict):  # a plain mapping from Python code: type it as a file would be
            self.online = from_dict(OnlineConfig, self.online, where="online")
        # Online, the rewrite generates with the model in training, which must be whole and plain.
        if self.online.enabled and (self.train.fsdp or self.train.peft.rank):
            raise ValueError("online: online mode rewrites with the model in training, which needs "
                             "train.fsdp false and train.peft.rank 0")


def check_run(config) -> None:
    """The settings that a loop and a comparison share: ``config.backend`` with its options checked,
    and the rewrite typed where Python code passed it as a plain mapping."""
    if config.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {config.backend!r}")
    config.backend_options = backend_options(config.backend, config.backend_options)
    if isinstance(config.rewrite, dict):  # a plain mapping from Python code: type it as a file would be
        config.rewrite = from_dict(RewriteConfig, config.rewrite, where="rewrite")


def run_rewrite_config(config) -> RewriteConfig:
    """The settings a run's rewrite generates with: ``config.rewrite`` with its hinted stream on the
    run's one ``backend`` (the rewrite records its backend among the settings of its rows)."""
    hinted = dataclasses.replace(config.rewrite.hinted, backend=config.backend)
    return dataclasses.replace(config.rewrite, hinted=hinted)


def backend_options(backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the keyword options of ``backend``'s class, coerced to their types."""
    signature = inspect.signature(BACKENDS[backend].__init__)
    hints = typing.get_type_hints(BACKENDS[backend].__init__)
    valid = {n: p for n, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    coerced = {}
    for key, value in options.items():
        if key not in valid:
            other = [name for name in BACKENDS if name != backend and key in inspect.signature(BACKENDS[name].__init__).parameters]
            why = f"an option of the {other[0]} backend, but backend is {backend!r}" if other else "unknown option"
            raise ValueError(f"backend_options.{key}: {why}; the {backend} backend takes {sorted(valid)}")
        coerced[key] = coerce(value, hints.get(key, Any), f"backend_options.{key}")
    return coerced


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls=LoopConfig):
    """``cls`` from a YAML file (missing keys keep their defaults), then the overrides."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        values = read_yaml(path) or {}
    config = from_dict(cls, values, where=str(path or "config"))
    return apply_overrides(config, overrides) if overrides else config

