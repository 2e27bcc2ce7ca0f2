"""Training any causal LM with any objective of the engine, on accelerate.

The one subtle part is the loss normalisation. Objectives return a token mean over their own
batch, but a micro-batch is an arbitrary slice of the optimizer step: averaging micro-batch
means would weight a token by how short its micro-batch happened to be. Instead every
micro-batch loss is rescaled by (its response tokens) / (response tokens of the whole step,
summed over all processes), so the accumulated gradient is exactly the gradient of the token
mean over the step, whatever the micro-batching or process count. Pairwise objectives
(DPO/SimPO) are means over pairs, so there the unit is a pair instead of a token.

Which rows make each step is planned in ``train_data``. Besides the weights, a run's
directory holds ``fingerprint.json`` (what the weights depend on: a resume or rerun with other
inputs is refused), ``train_data.json`` (rows truncated, skipped and repeated),
``logs/train/metrics.jsonl`` and, while it runs, the resume state (``train_state``).
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
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm

from onpolicy_sft.config import TrainConfig, check_train
from onpolicy_sft.config_io import to_dict
from onpolicy_sft.fsdp import full_state, grad_norm_value, is_sharded, shard
from onpolicy_sft.train_data import has_cached_ref_logps
from onpolicy_sft.lora import apply_lora, is_lora, save_lora
from onpolicy_sft.models import load_model
from onpolicy_sft.objectives import Objective, build
from onpolicy_sft.objectives.adapters import causal_lm_loss, sequence_logps
from onpolicy_sft.ops import IGNORE_INDEX
from onpolicy_sft.run import RunDir
from onpolicy_sft.rundir import save_into, write_json, write_text
from onpolicy_sft.train_data import BlockData, Blocks, TrainData, setup_data
from onpolicy_sft.train_state import (DONE_FILE, STATE_DIR, fingerprint, load_finished, save_state, setup_run_dir,
                                      setup_state)

logger = logging.getLogger(__name__)

DATA_RECORD = "train_data.json"  # what happened to the rows: truncated, skipped, duplicated
CONFIG_RECORD = Path("logs") / "train" / "config.json"
METRICS_FILE = Path("logs") / "train" / "metrics.jsonl"


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


def setup_training(accelerator: Accelerator, model, objective: Objective, config: TrainConfig, data: TrainData,
                   out_dir: Path, *, teacher=None, ref=None):
    """(wrapped, optimizer, scheduler, start_step): the model with its objective and frozen models and
    its optimizer, prepared by accelerate; a killed run's saved state loaded; the trackers started."""
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
    return wrapped, optimizer, scheduler, start_step


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


def finish_training(accelerator: Accelerator, wrapped, model) -> None:
    """The trackers closed and ``model`` left as it was saved (a LoRA model merged), in eval mode."""
    # Not end_training(): it destroys the process group, which the loop's later stages still use.
    for tracker in accelerator.trackers:
        tracker.finish()
    trained = accelerator.unwrap_model(wrapped).model
    if is_lora(trained):
        trained.merge_and_unload()  # ``model`` itself becomes the merged model, as saved
    model.eval()


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
    ``model`` instead of training again. One run at a time per out_dir (``run.RunDir``).
    What tokenizing did to the rows is in ``train_data.json`` and on the console.
    ``on_step(steps_done)`` is called after every optimizer step.

    With ``blocks`` the run trains online (``Blocks``, ``BlockData``): ``dataset`` only sizes the
    run (its steps and rows, as offline training on it would have), and the rows come block by block.
    """
    check_config(config)
    with RunDir(out_dir, "training run") as run:
        objective = setup_objective(config, objective)
        accelerator = setup_accelerator(config, run.path)
        data = setup_data(dataset, tokenizer, objective, config, accelerator.num_processes)
        inputs = fingerprint(config, objective, data, model, teacher=teacher, ref=ref)
        if blocks is not None:
            inputs.update({"online.steps": blocks.steps, **blocks.settings})
            data = BlockData(data, blocks, model, tokenizer, objective, config, accelerator.num_processes)
        if setup_run_dir(run, inputs) == "finished":
            load_finished(model, run.path)
            model.eval()
            logger.warning("%s already holds this finished training run; its weights are loaded, not retrained",
                           run.path)
            return run.path
        run.write_json(DATA_RECORD, data.record)
        run.write_json(CONFIG_RECORD, to_dict(config))
        wrapped, optimizer, scheduler, start_step = setup_training(accelerator, model, objective, config, data,
                                                                   run.path, teacher=teacher, ref=ref)
        train_loop(accelerator, model, wrapped, optimizer, scheduler, data, config, out_dir=run.path,
                   start_step=start_step, desc=f"train {objective.name}", on_step=on_step)
        save_final(accelerator, wrapped, tokenizer, run.path, data=data, objective=objective)
        finish_training(accelerator, wrapped, model)
        return run.path
