"""A training run's directory across attempts: what the run's weights depend on (its fingerprint),
whether the directory holds a new, a killed or a finished run of them, and the resume state a
killed run continues from, bit-exactly.

The resume state is ``trainer_state/step_<n>/``: weights, optimizer, scheduler and RNG states as
safetensors and JSON, so that nothing read back is a pickle; ``latest.json`` beside it points at
the last complete one. A finished run leaves ``training_complete.json`` and its weights instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from onpolicy_sft.config import TrainConfig
from onpolicy_sft.config_io import to_dict
from onpolicy_sft.fsdp import full_optimizer_state, full_state, is_sharded, load_full_state
from onpolicy_sft.models import weights_digest
from onpolicy_sft.objectives import Objective
from onpolicy_sft.run import RunDir, on_main
from onpolicy_sft.rundir import read_json, replace_with, write_json
from onpolicy_sft.train_data import TrainData

logger = logging.getLogger(__name__)

STATE_DIR = "trainer_state"
DONE_FILE = "training_complete.json"
STATE_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.json")


# ---------------------------------------------------------------------------------------------
# What a run's weights depend on, and what its directory holds of them


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


def fingerprint(config: TrainConfig, objective: Objective, data: TrainData, model, *, teacher=None,
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


def setup_run_dir(run: RunDir, inputs: dict) -> str:
    """What the run's directory holds for this run: "new", "resume" (saved state of a run with the
    same ``inputs``) or "finished" (a completed run with the same inputs and its weights). A directory
    whose saved state or finished run came from other inputs is refused (``rundir.InputsChanged``),
    naming each input that differs. A finished run of the same inputs whose weights were deleted
    (the comparison keeps only results) is trained again: the same inputs give the same weights."""
    done = run.exists(DONE_FILE)
    if not done and not run.exists(Path(STATE_DIR, "latest.json")):
        # Nothing saved to resume: whatever inputs a killed earlier attempt had no longer matter.
        run.check_inputs(inputs, restart=True)
        return "new"
    run.check_inputs(inputs, what="finished training run" if done else "training run")
    if not done:
        return "resume"
    if any(run.path.glob("*.safetensors")):
        return "finished"
    logger.warning("%s records a finished run of these inputs whose weights were deleted: training it again",
                   run.path)
    on_main(run.file(DONE_FILE).unlink)
    return "new"


def setup_state(accelerator: Accelerator, model, optimizer, scheduler, out_dir: Path, total_steps: int) -> int:
    """The step to start at: 0, or the last saved step of a killed run, whose state is loaded."""
    resumed = latest_state(out_dir)
    if resumed is None:
        return 0
    start_step, state_dir = resumed
    load_state(accelerator, model, optimizer, scheduler, state_dir)
    logger.warning("resuming training at step %d/%d from %s", start_step, total_steps, state_dir)
    return start_step


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

