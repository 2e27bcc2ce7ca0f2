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
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from onpolicy_sft.config import TrainConfig, to_dict
from onpolicy_sft.data import collate_rows, has_cached_ref_logps, row_lengths, tokenize_for_objective
from onpolicy_sft.models import load_model
from onpolicy_sft.objectives import Objective, build
from onpolicy_sft.objectives.adapters import causal_lm_loss, sequence_logps
from onpolicy_sft.ops import IGNORE_INDEX

logger = logging.getLogger(__name__)

STATE_DIR = "trainer_state"
DONE_FILE = "training_complete.json"


def plan_steps(
    lengths: list[int],
    *,
    batch_size: int,
    micro_batch_size: int,
    num_processes: int = 1,
    epochs: float = 1.0,
    seed: int = 0,
    group_by_length: bool = True,
) -> list[list[list[list[int]]]]:
    """``steps[s][p]`` = the micro-batches (lists of row indices) process ``p`` runs at step ``s``.

    Rows are shuffled per epoch with ``seed`` and cut into steps of ``batch_size`` rows. Within a
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
    total = max(1, round(epochs * n))
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

    def __init__(self, model, objective, *, fused: bool = True, teacher=None, ref=None):
        super().__init__()
        self.model = model
        self.objective = objective
        self.fused = fused
        self._frozen = {"teacher": teacher, "ref": ref}

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 0.0):
        teacher, ref = self._frozen["teacher"], self._frozen["ref"]
        ref_logps = batch.get("ref_logps")  # cached with the pairs (preference.add_reference_logps)
        if ref_logps is None and "ref_logps" in self.objective.needs:
            with torch.no_grad():
                ref_logps = sequence_logps(ref, batch)
        if self.fused:
            return causal_lm_loss(
                self.model, self.objective, batch, teacher=teacher, ref=ref, progress=progress, ref_logps=ref_logps
            )
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


def step_gradients(wrapped, micro_batches, *, pairwise: bool, progress: float, accelerator=None):
    """Accumulate the gradient of one optimizer step; returns (loss, metrics, units, tokens) of the step.

    ``micro_batches`` are this process's collated batches (None for an empty one). Each loss is
    scaled by its share of the step's units over all processes (see the module docstring); DDP
    averages gradients over processes, hence the extra factor ``num_processes``.
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
    fallback = next(b for b in micro_batches if b is not None) if any(b is not None for b in micro_batches) else None
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
    if setting not in ("no", "bf16", "fp16"):
        raise ValueError(f"train.mixed_precision must be auto, no, bf16 or fp16; got {setting!r}")
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


class JsonlTracker(GeneralTracker):
    """One JSON object per logged step in ``<logging_dir>/<run>/metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir):
        super().__init__()
        self.path = Path(logging_dir) / run_name / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def _trackers(names: list[str], logging_dir: Path):
    out = []
    for name in names:
        if name == "jsonl":
            out.append(JsonlTracker("train", logging_dir))
        else:
            out.append(name)
    return out


def _save_state(accelerator, out_dir: Path, step: int) -> None:
    """accelerate state (weights, optimizer, scheduler, RNG) of ``step``, switched to atomically."""
    root = out_dir / STATE_DIR
    target = root / f"step_{step}"
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pointer = root / "latest.json"
        tmp = root / "latest.json.tmp"
        tmp.write_text(json.dumps({"step": step, "dir": target.name}))
        os.replace(tmp, pointer)
        for old in root.glob("step_*"):
            if old.name != target.name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _latest_state(out_dir: Path) -> tuple[int, Path] | None:
    pointer = out_dir / STATE_DIR / "latest.json"
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text())
    return info["step"], out_dir / STATE_DIR / info["dir"]


def setup_objective(config: TrainConfig, objective: Objective | None = None) -> Objective:
    """The objective passed in, or the one ``config.objective`` names with its hyperparameters."""
    if objective is None:
        objective = build(config.objective.name, **config.objective.hparams)
    return objective


def setup_frozen_models(model, objective: Objective, config: TrainConfig, dataset, *, teacher=None, ref=None):
    """(teacher, ref): those passed in, else loaded from ``config.teacher`` / ``config.ref`` when the
    objective needs them ("base": a frozen copy of the starting model; the reference's default). A
    reference is not loaded when the pairs already carry its log-probs."""
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
    cached_ref = (needs & {"ref", "ref_logps"}) == {"ref_logps"} and has_cached_ref_logps(dataset)
    if needs & {"ref", "ref_logps"} and ref is None and not cached_ref:
        ref = _load_frozen(config.ref or "base", model, "reference", device, dtype)
    return teacher, ref


def setup_accelerator(config: TrainConfig, out_dir: Path) -> Accelerator:
    set_seed(config.seed)
    return Accelerator(
        mixed_precision=_mixed_precision(config.mixed_precision),
        log_with=_trackers(config.trackers, out_dir / "logs") or None,
        project_dir=str(out_dir),
        step_scheduler_with_optimizer=False,
    )


@dataclass
class TrainData:
    """The tokenized rows and the plan of which rows every process runs at every step."""

    dataset: object  # datasets.Dataset with input_ids/labels (or chosen_/rejected_ versions)
    plan: list[list[list[list[int]]]]  # plan_steps' steps[s][p] = micro-batches of row indices
    pairwise: bool
    pad_token_id: int

    @property
    def total_steps(self) -> int:
        return len(self.plan)

    def micro_batches(self, step: int, process_index: int, device) -> list[dict[str, torch.Tensor] | None]:
        return [collate_rows(self.dataset, rows, self.pad_token_id, self.pairwise, device)
                for rows in self.plan[step][process_index]]


def setup_data(dataset, tokenizer, objective: Objective, config: TrainConfig, num_processes: int) -> TrainData:
    pairwise = bool(objective.pairwise)
    dataset = tokenize_for_objective(dataset, tokenizer, max_length=config.max_length, pairwise=pairwise)
    if len(dataset) == 0:
        raise ValueError(f"no training row is left after tokenizing: do the prompts fit train.max_length "
                         f"({config.max_length})?")
    plan = plan_steps(
        row_lengths(dataset, pairwise),
        batch_size=config.batch_size,
        micro_batch_size=config.micro_batch_size,
        num_processes=num_processes,
        epochs=config.epochs,
        seed=config.seed,
        group_by_length=config.group_by_length,
    )
    if config.max_steps is not None:
        plan = plan[: config.max_steps]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TrainData(dataset=dataset, plan=plan, pairwise=pairwise, pad_token_id=pad_id)


def setup_model(model, objective: Objective, config: TrainConfig, accelerator: Accelerator, *, teacher=None,
                ref=None) -> ObjectiveModel:
    """The trained model in training mode with its objective; the frozen models on the training device."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    for frozen in (teacher, ref):
        if frozen is not None:
            frozen.to(accelerator.device)
    return ObjectiveModel(model, objective, fused=config.fused, teacher=teacher, ref=ref)


def setup_optimizer(model, config: TrainConfig, total_steps: int):
    """(optimizer, scheduler): AdamW and the warmup+cosine schedule over ``total_steps``."""
    optimizer = build_optimizer(model, config)
    return optimizer, cosine_with_warmup(optimizer, total_steps, config.warmup_ratio, config.min_lr_ratio)


def setup_state(accelerator: Accelerator, out_dir: Path, total_steps: int) -> int:
    """The step to start at: 0, or the last saved step of a killed run, whose state is loaded."""
    resumed = _latest_state(out_dir)
    if resumed is None:
        return 0
    start_step, state_path = resumed
    accelerator.load_state(str(state_path))
    logger.info("resuming training at step %d/%d from %s", start_step, total_steps, state_path)
    return start_step


def train_loop(accelerator: Accelerator, wrapped, optimizer, scheduler, data: TrainData, config: TrainConfig, *,
               out_dir: Path, start_step: int = 0, desc: str = "train",
               on_step: Callable[[int], None] | None = None) -> None:
    """Run the optimizer steps ``start_step`` .. end: gradients, clipping, update, log, save state.
    ``on_step(step)`` is called after each step (and its state save) with the number of steps done."""
    total_steps = data.total_steps
    bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
               disable=not (config.progress and accelerator.is_local_main_process))
    started, seen_tokens = time.perf_counter(), 0
    for step in range(start_step, total_steps):
        step_start = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        micro = data.micro_batches(step, accelerator.process_index, accelerator.device)
        loss, metrics, units, tokens = step_gradients(
            wrapped, micro, pairwise=data.pairwise, progress=step / total_steps, accelerator=accelerator
        )
        grad_norm = None
        if config.max_grad_norm:
            grad_norm = float(accelerator.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seen_tokens += tokens * accelerator.num_processes
        now = time.perf_counter()
        speed = seen_tokens / max(1e-9, now - started)
        if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
            values = {"train/loss": loss, "train/lr": lr, "train/units": units, "train/tokens": tokens,
                      "train/step_seconds": now - step_start, "train/tokens_per_s": speed}
            if grad_norm is not None:
                values["train/grad_norm"] = grad_norm
            values.update({f"train/{k}": v for k, v in metrics.items()})
            accelerator.log(values, step=step + 1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed:.0f}")
        bar.update(1)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            _save_state(accelerator, out_dir, step + 1)
        if on_step is not None:
            on_step(step + 1)
    bar.close()


def save_final(accelerator: Accelerator, wrapped, tokenizer, out_dir: Path, *, total_steps: int,
               objective: Objective) -> None:
    """The trained weights and tokenizer in save_pretrained format; the resume state goes."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(wrapped)
    if accelerator.is_main_process:
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        trained = accelerator.unwrap_model(wrapped).model
        trained.save_pretrained(out_dir, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        (out_dir / DONE_FILE).write_text(json.dumps({"steps": total_steps, "objective": objective.name}))
        shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)


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
) -> Path:
    """Fine-tune ``model`` in place on ``dataset`` and save it to ``out_dir`` (save_pretrained format).

    ``dataset`` has prompt/response columns (or prompt/chosen/rejected for pairwise objectives),
    or is already tokenized (input_ids and unshifted labels). ``objective`` defaults to
    ``objectives.build(config.objective.name, **config.objective.hparams)``. A teacher or
    reference the objective needs and that is not passed is loaded from ``config.teacher`` /
    ``config.ref`` ("base": a frozen copy of the starting model; the default for a reference).
    With ``config.save_every`` > 0 the run is resumable: calling ``train`` again with the same
    out_dir after a kill continues from the last saved step and ends with the same weights.
    ``on_step(steps_done)`` is called after every optimizer step.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    objective = setup_objective(config, objective)
    teacher, ref = setup_frozen_models(model, objective, config, dataset, teacher=teacher, ref=ref)
    accelerator = setup_accelerator(config, out_dir)
    data = setup_data(dataset, tokenizer, objective, config, accelerator.num_processes)
    wrapped = setup_model(model, objective, config, accelerator, teacher=teacher, ref=ref)
    optimizer, scheduler = setup_optimizer(model, config, data.total_steps)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    start_step = setup_state(accelerator, out_dir, data.total_steps)
    flat_config = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in to_dict(config).items()}
    accelerator.init_trackers("train", config=flat_config)

    train_loop(accelerator, wrapped, optimizer, scheduler, data, config, out_dir=out_dir, start_step=start_step,
               desc=f"train {objective.name}", on_step=on_step)
    save_final(accelerator, wrapped, tokenizer, out_dir, total_steps=data.total_steps, objective=objective)
    accelerator.end_training()
    model.eval()
    return out_dir
