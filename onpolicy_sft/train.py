"""Training any causal LM with any objective of the engine, on accelerate.

The one subtle part is the loss normalisation. Objectives return a token mean over their own
batch, but a micro-batch is an arbitrary slice of the optimizer step: averaging micro-batch
means would weight a token by how short its micro-batch happened to be. Instead every
micro-batch loss is rescaled by (its response tokens) / (response tokens of the whole step,
summed over all processes), so the accumulated gradient is exactly the gradient of the token
mean over the step, whatever the micro-batching or process count. Pairwise objectives
(DPO/SimPO) are means over pairs, so there the unit is a pair instead of a token.

The rows of an optimizer step are fixed by the seed alone (``plan_steps``); only how they are
split into micro-batches depends on the micro-batch size and the number of processes. That is
what makes 1×8 and 4×2 the same update, and what lets a resumed run replay the same data.

Besides the weights, a run's directory holds ``train_inputs.json`` (what the weights depend on:
a resume or rerun with other inputs is refused), ``train_data.json`` (rows truncated, skipped and
repeated), ``logs/train/metrics.jsonl`` and, while it runs, ``trainer_state/step_<n>/``: weights,
optimizer, scheduler and RNG states as safetensors and JSON, so that nothing read back is a pickle.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from onpolicy_sft.config import TrainConfig, check_train, to_dict
from onpolicy_sft.data import (
    collate_rows,
    duplicate_rows,
    has_cached_ref_logps,
    row_lengths,
    tokenize_for_training,
)
from onpolicy_sft.run import process_state
from onpolicy_sft.fsdp import full_optimizer_state, full_state, grad_norm_value, is_sharded, load_full_state, shard
from onpolicy_sft.lora import apply_lora, is_lora, save_lora
from onpolicy_sft.models import load_model, weights_digest
from onpolicy_sft.objectives import Objective, build
from onpolicy_sft.objectives.adapters import causal_lm_loss, sequence_logps
from onpolicy_sft.ops import IGNORE_INDEX
from onpolicy_sft.rundir import (RunLock, check_fingerprint, check_writable, digest, read_json, replace_with, save_into,
                                 write_json, write_text)

logger = logging.getLogger(__name__)

STATE_DIR = "trainer_state"
DONE_FILE = "training_complete.json"
FINGERPRINT_FILE = "train_inputs.json"  # what the run's weights depend on (``fingerprint``)
DATA_RECORD = "train_data.json"  # what happened to the rows: truncated, skipped, duplicated
METRICS_FILE = Path("logs") / "train" / "metrics.jsonl"
STATE_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.json")


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


class ObjectiveModel(nn.Module):
    """The trained model plus its objective, as one module whose forward returns (loss, metrics).

    Going through a single ``forward`` is what lets DDP/FSDP hook the backward pass and
    accelerate apply autocast; the teacher and reference stay outside the module's parameters.
    """

    def __init__(self, model, objective, *, fused: bool = True, teacher=None, ref=None, packed: bool = False):
        super().__init__()
        self.model = model
        self.objective = objective
        self.fused = fused
        self.packed = packed  # padding-free decoder passes (onpolicy_sft.packing); fused path only
        self._frozen = {"teacher": teacher, "ref": ref}

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 0.0):
        teacher, ref = self._frozen["teacher"], self._frozen["ref"]
        ref_logps = batch.get("ref_logps")  # cached with the pairs (preference.add_reference_logps)
        if ref_logps is None and "ref_logps" in self.objective.needs:
            with torch.no_grad():
                ref_logps = sequence_logps(ref, batch, packed=self.packed)
        if self.fused:
            return causal_lm_loss(self.model, self.objective, batch, teacher=teacher, ref=ref, progress=progress,
                                  ref_logps=ref_logps, packed=self.packed)
        return self._unfused_loss(batch, progress, teacher, ref, ref_logps)

    def _unfused_loss(self, batch, progress, teacher, ref, ref_logps):
        """Full [B, T, V] logits: the reference path for models or objectives the fused one lacks."""

        def logits_of(model):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]

        context = {"progress": progress}
        with torch.no_grad():
            if teacher is not None:
                context["teacher_logits"] = logits_of(teacher)
            if "ref" in self.objective.needs:
                context["ref_logits"] = logits_of(ref)
        if ref_logps is not None:
            context["ref_logps"] = ref_logps
        return self.objective.from_logits(logits_of(self.model), batch["labels"][:, 1:], **context)


def count_units(batch: dict[str, torch.Tensor], pairwise: bool) -> int:
    """What the objective averages over: pairs for DPO/SimPO, response tokens (after the shift) otherwise."""
    if pairwise:
        return batch["input_ids"].shape[0] // 2
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def step_gradients(wrapped, micro_batches, *, pairwise: bool, progress: float, accelerator=None, filler=None):
    """Accumulate the gradient of one optimizer step; returns (loss, metrics, units, tokens) of the step.

    ``micro_batches`` are this process's collated batches (None for an empty one). Each loss is
    scaled by its share of the step's units over all processes (see the module docstring); DDP
    averages gradients over processes, hence the extra factor ``num_processes``. An empty
    micro-batch runs another batch with weight 0 instead (``filler`` when this process has none
    at all: a last step with fewer rows than processes), so that every process makes the same
    collective calls.
    """
    num_processes = accelerator.num_processes if accelerator is not None else 1
    local_units = [count_units(b, pairwise) if b is not None else 0 for b in micro_batches]
    total = torch.tensor(float(sum(local_units)))
    if accelerator is not None and num_processes > 1:
        total = accelerator.reduce(total.to(accelerator.device), reduction="sum").cpu()
    total_units = float(total)
    if total_units == 0:
        raise ValueError("an optimizer step has no response tokens: check the labels (all −100?)")
    step_loss, metrics, tokens = 0.0, {}, 0
    fallback = next((b for b in micro_batches if b is not None), filler)
    for i, (batch, units) in enumerate(zip(micro_batches, local_units)):
        last = i == len(micro_batches) - 1
        if batch is None:
            batch = fallback  # keeps DDP's collective calls in step; weight 0 adds nothing
        if batch is None:
            continue
        share = units / total_units
        sync = accelerator.no_sync(wrapped) if (accelerator is not None and not last) else contextlib.nullcontext()
        with sync:
            loss, batch_metrics = wrapped(batch, progress=progress)
            scaled = loss * (share * num_processes)
            if accelerator is not None:
                accelerator.backward(scaled)
            else:
                scaled.backward()
        step_loss += float(loss.detach()) * share
        for key, value in batch_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + float(value) * share
        tokens += int(batch["attention_mask"].sum()) if units else 0
    return step_loss, metrics, total_units, tokens


def _frozen(model):
    model = copy.deepcopy(model) if model is not None else None
    if model is not None:
        model.eval().requires_grad_(False)
    return model


def _load_frozen(spec: str | None, starting_model, role: str, device, dtype):
    if spec is None:
        return None
    if spec == "base":
        return _frozen(starting_model)
    logger.info("loading %s model %s (frozen)", role, spec)
    model, _ = load_model(spec, device=device, dtype=dtype)
    return model.requires_grad_(False)


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


def build_optimizer(model, config: TrainConfig):
    """AdamW with weight decay on matrices only (norms and biases excluded), and the warmup+cosine schedule."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps)


def cosine_with_warmup(optimizer, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0):
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _trackers(names: list[str]) -> list[str]:
    """The accelerate trackers (tensorboard, wandb, ...); "jsonl" is our own ``MetricsLog``."""
    return [name for name in names if name != "jsonl"]


class MetricsLog:
    """``logs/train/metrics.jsonl``: one JSON object per logged step, written by the main process only.

    Opened at ``start_step`` it keeps the lines of steps up to there and drops the rest (steps a
    killed run logged after its last saved state, which the resumed run replays), so every step
    appears once.
    """

    def __init__(self, path: Path, *, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if start_step and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the half-written last line of a killed run
                    continue
                if record.get("step", 0) <= start_step:
                    kept.append(line + "\n")
        write_text(path, "".join(kept))

    def log(self, values: dict, step: int) -> None:
        if self.enabled:
            # Appended, so opened without following a link that might have been put in its place.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


# ---------------------------------------------------------------------------------------------
# Resume state: safetensors and JSON only, so reading it back can never run code (no pickle).


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *map(_plain, numpy_state[2:])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _optimizer_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict split into tensors (for safetensors) and the rest (for JSON)."""
    tensors, values = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                values[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "values": values}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["values"].items()]:
        index, key = name.rsplit(".", 1)  # a sharded model's optimizer state is keyed by parameter name
        state.setdefault(int(index) if index.isdigit() else index, {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_state(accelerator: Accelerator, model, optimizer, scheduler, out_dir: Path, step: int) -> None:
    """Everything a resumed run needs to continue bit-exactly after ``step``: the model's weights,
    the optimizer and scheduler, the grad scaler, and every process's RNG states. The main process
    writes it to ``step_<n>/`` and then moves the ``latest.json`` pointer, so a kill at any moment
    leaves the previous complete state in use."""
    rng = gather_object([_rng_state()]) if accelerator.num_processes > 1 else [_rng_state()]
    sharded = is_sharded(model)
    if sharded:  # FSDP: the full weights and optimizer state, gathered by every process together
        weights, optimizer_state = full_state(model), full_optimizer_state(model, _unwrapped(optimizer))
    if accelerator.is_main_process:
        root = out_dir / STATE_DIR
        target = root / f"step_{step}"
        shutil.rmtree(target, ignore_errors=True)  # a half-written one from a killed attempt
        target.mkdir(parents=True)
        if sharded:
            replace_with(target / "model.safetensors",
                         lambda tmp: safetensors.torch.save_file(_unshared(weights), str(tmp)))
        else:
            replace_with(target / "model.safetensors", lambda tmp: safetensors.torch.save_model(model, str(tmp)))
        tensors, meta = _optimizer_files(optimizer_state if sharded else optimizer.state_dict())
        replace_with(target / "optimizer.safetensors", lambda tmp: safetensors.torch.save_file(tensors, str(tmp)))
        write_json(target / "optimizer.json", meta)
        write_json(target / "scheduler.json", scheduler.state_dict())
        if accelerator.scaler is not None:
            write_json(target / "scaler.json", accelerator.scaler.state_dict())
        write_json(target / "rng.json", rng)
        write_json(root / "latest.json", {"step": step, "dir": target.name})
        for old in root.glob("step_*"):
            if old.name != target.name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give each repeat its own copy."""
    seen, out = set(), {}
    for name, tensor in weights.items():
        out[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return out


def latest_state(out_dir: Path) -> tuple[int, Path] | None:
    """(step, directory) of the last complete resume state in ``out_dir``, or None."""
    info = read_json(out_dir / STATE_DIR / "latest.json")
    if info is None:
        return None
    return info["step"], out_dir / STATE_DIR / info["dir"]


class DamagedFile(ValueError):
    """A file a run saved is cut short or corrupt (a kill during a copy, a full disk)."""


def read_saved(path: Path, read: Callable, fix: str):
    """``read(path)``, where a damaged file is one line naming it and ``fix`` instead of a
    deserializer's traceback."""
    try:
        return read(path)
    except (safetensors.SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFile(f"{path} is damaged or cut short ({err}); {fix}") from None


def load_state(accelerator: Accelerator, model, optimizer, scheduler, state_dir: Path) -> None:
    """Restore what ``save_state`` wrote. Only the files it names are read, all safetensors or JSON."""
    missing_files = [name for name in STATE_FILES if not (state_dir / name).exists()]
    if missing_files:
        raise FileNotFoundError(f"{state_dir} lacks {', '.join(missing_files)}: it is not resume state this version "
                                f"wrote (or not all of it); delete {state_dir.parent} to train from the start")
    fix = f"delete {state_dir.parent} to train from the start (no earlier state is kept)"

    def saved(name: str, read: Callable):
        return read_saved(state_dir / name, read, fix)

    optimizer_state = _optimizer_state(saved("optimizer.safetensors", safetensors.torch.load_file),
                                       saved("optimizer.json", read_json))
    if is_sharded(model):
        weights = saved("model.safetensors", safetensors.torch.load_file)
        load_full_state(model, weights, _unwrapped(optimizer), optimizer_state)
    else:
        missing, unexpected = saved("model.safetensors",
                                    lambda path: safetensors.torch.load_model(model, path, strict=False))
        if missing or unexpected:
            raise RuntimeError(f"{state_dir}: the saved weights do not fit this model (missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}); was the run started from another model?")
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(saved("scheduler.json", read_json))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved("scaler.json", read_json))
    rng = saved("rng.json", read_json)
    if len(rng) != accelerator.num_processes:
        logger.warning("the state in %s was saved by %d processes, resumed by %d: random streams are not "
                       "replayed exactly", state_dir, len(rng), accelerator.num_processes)
    _set_rng_state(rng[accelerator.process_index % len(rng)])


# ---------------------------------------------------------------------------------------------
# What a run's result depends on, and the record of its rows


DISPLAY_FIELDS = ("progress", "trackers", "log_every", "save_every")  # change the output's looks, not its weights


def _model_identity(model) -> dict | None:
    """Size and a content digest of a model's weights: what tells a starting model apart without
    hashing gigabytes. Not its path: the same weights moved or named another way are the same start."""
    if model is None:
        return None
    return {"parameters": sum(p.numel() for p in model.parameters()), "weights": weights_digest(model)}


def _data_digest(dataset) -> str:
    """A digest of the token columns (and cached reference log-probs) of every row, in order."""
    columns = sorted(c for c in dataset.column_names
                     if c.endswith(("input_ids", "labels")) or c in ("ref_chosen_logp", "ref_rejected_logp"))
    hasher = hashlib.sha256(json.dumps(columns).encode())
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=4096):
        for column in columns:
            values = table.column(column).combine_chunks()
            if hasattr(values, "flatten"):  # a list column: its lengths and its values
                hasher.update(values.value_lengths().to_numpy().tobytes())
                values = values.flatten()
            hasher.update(values.to_numpy().tobytes())
    return hasher.hexdigest()[:16]


def fingerprint(config: TrainConfig, objective: Objective, data: "TrainData", model, *, teacher=None,
                ref=None) -> dict:
    """What determines a run's weights, flat so that a refused resume names the field that differs:
    the config (less its display fields), the objective and its hyperparameters, a digest of the
    tokenized rows, and the identity of the starting model and of any teacher or reference."""
    settings = {k: v for k, v in to_dict(config).items() if k not in DISPLAY_FIELDS and k != "objective"}
    flat = {f"train.{k}": v for k, v in settings.items()}
    flat["objective.name"] = objective.name
    flat["objective.chunk_tokens"] = objective.chunk_tokens
    if config.objective.name == objective.name:
        flat["objective.hparams"] = config.objective.hparams
    flat["data.rows"] = len(data.dataset)
    flat["data.digest"] = _data_digest(data.dataset)
    for role, value in (("model", model), ("teacher", teacher), ("ref", ref)):
        identity = _model_identity(value)
        for key, item in (identity or {}).items():
            flat[f"{role}.{key}"] = item
    return flat


def check_config(config: TrainConfig) -> None:
    """The config's own checks again, for a caller that changed a field after building it."""
    try:
        check_train(config)
    except ValueError as err:
        raise ValueError(f"train.{err}") from None


def setup_objective(config: TrainConfig, objective: Objective | None = None) -> Objective:
    """The objective passed in, or the one ``config.objective`` names with its hyperparameters."""
    if objective is None:
        objective = build(config.objective.name, **config.objective.hparams)
    return objective


def setup_frozen_models(model, objective: Objective, config: TrainConfig, dataset, *, teacher=None, ref=None):
    """(teacher, ref): those passed in, else loaded from ``config.teacher`` / ``config.ref`` when the
    objective needs them ("base": a frozen copy of the starting model; the reference's default). A
    reference is not loaded when the pairs already carry its log-probs. An objective that only
    uses a teacher when given one (target_sft) says so when it has none."""
    needs = set(objective.needs)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    wants_teacher = "teacher" in needs or ("teacher" in objective.accepts and config.teacher is not None)
    if wants_teacher and teacher is None:
        if config.teacher is None:
            raise ValueError(
                f"objective {objective.name!r} needs a teacher: pass teacher= or set train.teacher "
                "(a model path/name, or 'base' for the frozen starting model)"
            )
        teacher = _load_frozen(config.teacher, model, "teacher", device, dtype)
    if "teacher" in objective.accepts and teacher is None:
        logger.warning("objective %r without a teacher targets the model's own detached distribution, which "
                       "gives the same gradient as dft; set train.teacher (a model, or 'base') for a teacher",
                       objective.name)
    cached_ref = (needs & {"ref", "ref_logps"}) == {"ref_logps"} and has_cached_ref_logps(dataset)
    if needs & {"ref", "ref_logps"} and ref is None and not cached_ref:
        ref = _load_frozen(config.ref or "base", model, "reference", device, dtype)
    return teacher, ref


def setup_accelerator(config: TrainConfig, out_dir: Path) -> Accelerator:
    set_seed(config.seed)
    return Accelerator(
        mixed_precision=_mixed_precision(config.mixed_precision),
        log_with=_trackers(config.trackers) or None,
        project_dir=str(out_dir),
        step_scheduler_with_optimizer=False,
    )


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


def setup_run_dir(out_dir: Path, inputs: dict, is_main: bool) -> str:
    """What ``out_dir`` holds for this run: "new", "resume" (saved state of a run with the same
    ``inputs``) or "finished" (a completed run with the same inputs and its weights). A directory
    whose saved state or finished run came from other inputs is refused (``rundir.InputsChanged``),
    naming each input that differs. A finished run of the same inputs whose weights were deleted
    (the comparison keeps only results) is trained again: the same inputs give the same weights."""
    done = (out_dir / DONE_FILE).exists()
    if done or latest_state(out_dir) is not None:
        if is_main:
            check_fingerprint(out_dir / FINGERPRINT_FILE, inputs, "finished training run" if done else "training run")
        if not done:
            return "resume"
        if any(out_dir.glob("*.safetensors")):
            return "finished"
        logger.warning("%s records a finished run of these inputs whose weights were deleted: training it again",
                       out_dir)
        if is_main:
            (out_dir / DONE_FILE).unlink()
        return "new"
    if is_main:  # nothing saved to resume: whatever inputs a killed earlier attempt had no longer matter
        (out_dir / FINGERPRINT_FILE).unlink(missing_ok=True)
        check_fingerprint(out_dir / FINGERPRINT_FILE, inputs, "training run")
    return "new"


def load_finished(model, out_dir: Path) -> None:
    """Load the weights of a finished run in ``out_dir`` into ``model`` (tied weights are saved once)."""
    weights = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        weights.update(read_saved(path, safetensors.torch.load_file,
                                  f"delete the *.safetensors files in {out_dir} and rerun to train it again"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in weights if k in state}
    untied = [k for k in missing if state[k].data_ptr() not in loaded]  # a tied weight shares a loaded one's storage
    if untied or unexpected:
        raise RuntimeError(f"{out_dir}: the finished weights do not fit this model (missing {sorted(untied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")


def setup_model(model, objective: Objective, config: TrainConfig, accelerator: Accelerator, *, teacher=None,
                ref=None) -> ObjectiveModel:
    """The trained model in training mode with its objective; the frozen models on the training device.
    With ``config.peft.rank`` > 0 the model gets LoRA adapters (in place) and only they train."""
    if config.peft.rank:
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("LoRA (train.peft.rank > 0) under an accelerate FSDP config is not supported: "
                             "launch data-parallel (distributed_type: MULTI_GPU) instead")
        model = apply_lora(model, config.peft)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    for frozen in (teacher, ref):
        if frozen is not None:
            frozen.to(accelerator.device)
    wrapped = ObjectiveModel(model, objective, fused=config.fused, teacher=teacher, ref=ref, packed=config.packing)
    if config.fsdp:
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("train.fsdp shards the model itself; under an accelerate FSDP config (which already "
                             "shards it) leave train.fsdp false")
        shard(wrapped, model, accelerator.mixed_precision)
    return wrapped


def setup_optimizer(model, config: TrainConfig, total_steps: int):
    """(optimizer, scheduler): AdamW and the warmup+cosine schedule over ``total_steps``."""
    optimizer = build_optimizer(model, config)
    return optimizer, cosine_with_warmup(optimizer, total_steps, config.warmup_ratio, config.min_lr_ratio)


def setup_state(accelerator: Accelerator, model, optimizer, scheduler, out_dir: Path, total_steps: int) -> int:
    """The step to start at: 0, or the last saved step of a killed run, whose state is loaded."""
    resumed = latest_state(out_dir)
    if resumed is None:
        return 0
    start_step, state_dir = resumed
    load_state(accelerator, model, optimizer, scheduler, state_dir)
    logger.warning("resuming training at step %d/%d from %s", start_step, total_steps, state_dir)
    return start_step


def train_loop(accelerator: Accelerator, model, wrapped, optimizer, scheduler, data: TrainData,
               config: TrainConfig, *, out_dir: Path, start_step: int = 0, desc: str = "train",
               on_step: Callable[[int], None] | None = None) -> None:
    """Run the optimizer steps ``start_step`` .. end: gradients, clipping, update, log, save state.
    ``on_step(steps_done)`` is called after each step (and its state save)."""
    total_steps = data.total_steps
    metrics_log = MetricsLog(out_dir / METRICS_FILE, start_step=start_step,
                             enabled="jsonl" in config.trackers and accelerator.is_main_process)
    bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
               disable=not (config.progress and accelerator.is_local_main_process))
    started, seen_tokens = time.perf_counter(), 0
    for step in range(start_step, total_steps):
        step_start = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        micro = data.micro_batches(step, accelerator.process_index, accelerator.device)
        filler = data.filler(step, accelerator.device) if all(b is None for b in micro) else None
        loss, metrics, units, tokens = step_gradients(
            wrapped, micro, pairwise=data.pairwise, progress=step / total_steps, accelerator=accelerator,
            filler=filler,
        )
        if accelerator.num_processes > 1:  # each process holds its share of the step's loss and metrics
            loss, tokens, metrics = _summed_over_processes(accelerator, loss, tokens, metrics)
        # Without clipping, an infinite max norm measures the gradient and scales nothing.
        grad_norm = grad_norm_value(accelerator.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm or math.inf))
        # fp16's grad scaler skips a step with infinite gradients itself, and lowers its scale.
        check_finite(step + 1, loss, grad_norm if accelerator.scaler is None else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seen_tokens += tokens
        now = time.perf_counter()
        speed = seen_tokens / max(1e-9, now - started)
        if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
            values = {"train/loss": loss, "train/lr": lr, "train/units": units, "train/tokens": tokens,
                      "train/step_seconds": now - step_start, "train/tokens_per_s": speed}
            if config.max_grad_norm:
                values["train/grad_norm"] = grad_norm
            values.update({f"train/{k}": v for k, v in metrics.items()})
            metrics_log.log(values, step + 1)
            accelerator.log(values, step=step + 1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed:.0f}")
        bar.update(1)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            save_state(accelerator, model, optimizer, scheduler, out_dir, step + 1)
        if on_step is not None:
            on_step(step + 1)
    bar.close()


class NonFiniteTraining(ValueError):
    """The loss or the gradient of a step is NaN or infinite: the weights would be garbage."""


def check_finite(step: int, loss: float, grad_norm: float | None) -> None:
    """Stop before a non-finite step reaches the weights (every process sees the same summed loss
    and global norm, so all stop together). The last saved state is the last good one."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    raise NonFiniteTraining(f"training step {step}: {what} is not finite; the weights were not updated with it. "
                            "Lower train.lr or set train.max_grad_norm, or check the data of that step")


def _summed_over_processes(accelerator: Accelerator, loss: float, tokens: int, metrics: dict):
    values = torch.tensor([loss, float(tokens), *metrics.values()], dtype=torch.float64)
    values = accelerator.reduce(values.to(accelerator.device), reduction="sum").cpu().tolist()
    return values[0], int(values[1]), dict(zip(metrics, values[2:]))


def save_final(accelerator: Accelerator, wrapped, tokenizer, out_dir: Path, *, data: TrainData,
               objective: Objective) -> None:
    """The trained weights and tokenizer in save_pretrained format, then the done marker; the
    resume state goes."""
    accelerator.wait_for_everyone()
    sharded = is_sharded(wrapped)
    state = full_state(wrapped) if sharded else accelerator.get_state_dict(wrapped)
    if accelerator.is_main_process:
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if sharded:  # the gathered state has a copy per name of a tied weight: keep the names save_pretrained keeps
            named = {n for n, _ in accelerator.unwrap_model(wrapped).model.named_parameters()}
            weights = {k: v for k, v in weights.items() if k in named or not k.endswith(("weight", "bias"))}
        trained = accelerator.unwrap_model(wrapped).model
        if is_lora(trained):
            save_into(out_dir, lambda d: save_lora(trained, d))  # the adapter, and the merged model later stages load
        else:
            save_into(out_dir, lambda d: trained.save_pretrained(d, state_dict=weights, safe_serialization=True))
        save_into(out_dir, tokenizer.save_pretrained)
        write_json(out_dir / DONE_FILE, {"steps": data.total_steps, "objective": objective.name,
                                         "processes": accelerator.num_processes, "rows": data.record})
        shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()


def train(
    model,
    tokenizer,
    dataset,
    config: TrainConfig,
    *,
    out_dir: str | Path,
    teacher=None,
    ref=None,
    objective: Objective | None = None,
    on_step: Callable[[int], None] | None = None,
    blocks: Blocks | None = None,
) -> Path:
    """Fine-tune ``model`` in place on ``dataset`` and save it to ``out_dir`` (save_pretrained format).

    ``dataset`` has prompt/response columns (or prompt/chosen/rejected for pairwise objectives),
    or is already tokenized (input_ids and unshifted labels). ``objective`` defaults to
    ``objectives.build(config.objective.name, **config.objective.hparams)``. A teacher or
    reference the objective needs and that is not passed is loaded from ``config.teacher`` /
    ``config.ref`` ("base": a frozen copy of the starting model; the default for a reference).

    With ``config.save_every`` > 0 the run is resumable: calling ``train`` again with the same
    out_dir after a kill continues from the last saved step and ends with the same weights. The
    inputs that determine the weights are recorded (``fingerprint``); a rerun with other inputs
    is refused, naming what differs, and a rerun of a finished run loads its weights into
    ``model`` instead of training again. One run at a time per out_dir (``rundir.RunLock``).
    What tokenizing did to the rows is in ``train_data.json`` and on the console.
    ``on_step(steps_done)`` is called after every optimizer step.

    With ``blocks`` the run trains online (``Blocks``, ``BlockData``): ``dataset`` only sizes the
    run (its steps and rows, as offline training on it would have), and the rows come block by block.
    """
    check_config(config)
    out_dir = check_writable(out_dir)
    is_main = process_state().is_main_process
    with RunLock(out_dir, "training run") if is_main else contextlib.nullcontext():
        objective = setup_objective(config, objective)
        accelerator = setup_accelerator(config, out_dir)
        data = setup_data(dataset, tokenizer, objective, config, accelerator.num_processes)
        inputs = fingerprint(config, objective, data, model, teacher=teacher, ref=ref)
        if blocks is not None:
            inputs.update({"online.steps": blocks.steps, **blocks.settings})
            data = BlockData(data, blocks, model, tokenizer, objective, config, accelerator.num_processes)
        status = setup_run_dir(out_dir, inputs, accelerator.is_main_process)
        if status == "finished":
            load_finished(model, out_dir)
            model.eval()
            logger.warning("%s already holds this finished training run; its weights are loaded, not retrained",
                           out_dir)
            return out_dir
        if accelerator.is_main_process:
            write_json(out_dir / DATA_RECORD, data.record)
            write_json(out_dir / "logs" / "train" / "config.json", to_dict(config))
        teacher, ref = setup_frozen_models(model, objective, config, data.dataset, teacher=teacher, ref=ref)
        wrapped = setup_model(model, objective, config, accelerator, teacher=teacher, ref=ref)
        optimizer, scheduler = setup_optimizer(model, config, data.total_steps)
        if config.fsdp:  # already sharded by setup_model: accelerate must not wrap it again (in DDP)
            optimizer = accelerator.prepare(optimizer)
        else:
            wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
        start_step = setup_state(accelerator, model, optimizer, scheduler, out_dir, data.total_steps)
        flat_config = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                       for k, v in to_dict(config).items()}
        accelerator.init_trackers("train", config=flat_config)

        train_loop(accelerator, model, wrapped, optimizer, scheduler, data, config, out_dir=out_dir,
                   start_step=start_step, desc=f"train {objective.name}", on_step=on_step)
        save_final(accelerator, wrapped, tokenizer, out_dir, data=data, objective=objective)
        # Not end_training(): it destroys the process group, which the loop's later stages still use.
        for tracker in accelerator.trackers:
            tracker.finish()
        trained = accelerator.unwrap_model(wrapped).model
        if is_lora(trained):
            trained.merge_and_unload()  # ``model`` itself becomes the merged model, as saved
        model.eval()
        return out_dir
