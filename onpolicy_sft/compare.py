"""The side-by-side comparison the two papers make (docs/methods.md §6), on the same prompts and budget.

Methods (each trained from the same base model with the same ``train`` settings, hence the same
optimizer steps per example, unless ``train_overrides`` says otherwise):

    base                        the starting model, evaluated once (greedy decoding is deterministic)
    sft, dft, target_sft, idft  on the original demonstrations
    hd_sft, hd_idft             on the Hinted-Decoding rewrite of the same prompts (decoding.rewrite)
    dpo, simpo                  DPO@k / SimPO@k on pairs from k base-model samples per prompt

The training corpora are built once, by the base model, so every seed of every method sees the
same prompts and the same samples; the seeds vary the training run (data order) and the sampling
seed of evaluation. Each (method, seed) cell writes ``cells/<method>/seed_<s>/result.json`` when
it finishes; running the comparison again skips finished cells and finished corpus stages.

Layout of out_dir: config.yaml, manifest.json (corpus stages and their wall times),
base/{general_responses.json, eval/metrics.json, eval/<split>/results.jsonl}, corpora/{original,hinted,pairs}/,
cells/<method>/seed_<s>/{result.json, eval/<split>/results.jsonl}, results.json, results.md, compare.png.
The results.jsonl files keep every greedy answer, so a score can be traced to the text behind it.

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) every process runs every stage and
cell, the stages splitting their rows across the processes; the main process alone takes the lock,
decides what is finished and writes (onpolicy_sft/stages.py), and every process returns its summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from decoding.rewrite import RewriteConfig, rewrite_with_stats
from decoding.sampling import SamplingConfig
from onpolicy_sft import ddt
from onpolicy_sft.config import (DataConfig, check_seed, EvalConfig, ModelConfig, ObjectiveConfig, TrainConfig, check_run_backend,
                                 from_dict, load_config, objective_hparams, save_config, to_dict)
from onpolicy_sft.distributed import process_state
from onpolicy_sft.evaluate import mean_and_se
from onpolicy_sft.grading import extract_answer
from onpolicy_sft.models import load_model, resolve_model_path
from onpolicy_sft.objectives import build
from onpolicy_sft.preference import add_reference_logps, build_pairs
from onpolicy_sft.rundir import RunLock, check_writable, read_json, replace_with, save_into, write_json, write_text
from onpolicy_sft.stages import (Manifest, evaluate_model, general_responses, in_step, load_data, main_decides,
                                 markdown_table, num, on_main, open_backend, pm, pyplot, source_counts, training_rows)
from onpolicy_sft.train import DONE_FILE, train

logger = logging.getLogger(__name__)

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
    """DPO@k / SimPO@k pair building (onpolicy_sft.preference.build_pairs)."""

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
        check_run_backend(self)


def _shallow(config) -> dict:
    return {f.name: to_dict(getattr(config, f.name)) if dataclasses.is_dataclass(getattr(config, f.name))
            else getattr(config, f.name) for f in dataclasses.fields(config)}


def load_compare_config(path=None, overrides: list[str] | None = None) -> CompareConfig:
    return load_config(path, overrides, cls=CompareConfig)


def _mean_phi(dataset) -> float:
    values = list(dataset["ddt_phi_mean"])
    return float(sum(values) / len(values)) if values else float("nan")


def _train_config(config: CompareConfig, method: str, seed: int) -> TrainConfig:
    objective = ObjectiveConfig(name=METHODS[method][0], hparams=dict(config.hparams.get(method, {})))
    return dataclasses.replace(config.train, seed=seed, objective=objective, **config.train_overrides.get(method, {}))


def run_comparison(config: CompareConfig) -> dict:
    """Run (or resume) every (method, seed) cell; returns the summary (rows, markdown table, paths)."""
    out = check_writable(config.out_dir)
    state = process_state()
    with contextlib.ExitStack() as held:
        on_main(lambda: held.enter_context(RunLock(out, "comparison")))
        data = load_data(config.data)
        on_main(lambda: save_config(config, out / "config.yaml"))
        manifest = Manifest(out / "manifest.json")
        base_path = resolve_model_path(config.model.name)
        load = dict(dtype=config.model.dtype, device=state.device, trust_remote_code=config.model.trust_remote_code)
        base, tokenizer = load_model(base_path, **load)
        backend, note = open_backend(config.backend, base, tokenizer, config.backend_options,
                                     trust_remote_code=config.model.trust_remote_code)
        manifest.data.update(backend=backend.name, backend_note=note, data_notes=data.notes)
        manifest.save()
        corpora = out / "corpora"
        general_file = out / "base" / "general_responses.json"
        needed = {METHODS[m][1] for m in config.methods if METHODS[m] is not None}

        def evaluation(model, seed: int, where: Path) -> dict:
            return evaluate_model(model, tokenizer, data.evals, dataclasses.replace(config.eval, seed=seed),
                                  backend=backend, base=base, general_file=general_file, out_dir=where)

        def original_corpus():
            scored = ddt.score(base, tokenizer, data.train, progress=False)
            if state.is_main_process:
                save_into(corpora, lambda d: scored.save_to_disk(str(d / "original")))
            return {"rows": len(scored), "phi_mean": _mean_phi(scored)}

        def hinted_corpus():
            corpus, stats = rewrite_with_stats(base, tokenizer, data.train, config.rewrite,
                                               out_dir=corpora / "hinted_shards", backend=backend)
            if "ddt_phi_mean" not in corpus.column_names:
                corpus = ddt.score(base, tokenizer, corpus, progress=False)
            if state.is_main_process:
                save_into(corpora, lambda d: corpus.save_to_disk(str(d / "hinted")))
            return {"rows": len(corpus), "phi_mean": _mean_phi(corpus), "sources": source_counts(corpus), "stats": stats}

        def pair_corpus():
            p = config.pairs
            sampling = SamplingConfig(temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens)
            start = time.perf_counter()
            pairs, counts = build_pairs(base, tokenizer, data.train, k=p.k, backend=backend, sampling=sampling,
                                        no_pair=p.no_pair, seed=config.data.seed)
            if len(pairs) == 0:
                raise ValueError(f"no preference pairs could be built ({counts}); raise pairs.k or use no_pair=demonstration")
            sample_seconds = time.perf_counter() - start
            start = time.perf_counter()
            pairs = add_reference_logps(base, tokenizer, pairs, max_length=config.train.max_length)
            ref_seconds = time.perf_counter() - start
            phi = {}
            for side in ("chosen", "rejected"):
                scored = ddt.score(base, tokenizer, pairs.select_columns(["prompt", "system", side, f"{side}_truncated"]),
                                   progress=False, response_column=side)
                phi[side] = _mean_phi(scored)
            if state.is_main_process:
                save_into(corpora, lambda d: pairs.save_to_disk(str(d / "pairs")))
            return {"rows": len(pairs), "counts": counts, "phi_mean": phi["chosen"], "phi_rejected": phi["rejected"],
                    "sample_seconds": round(sample_seconds, 2), "ref_logps_seconds": round(ref_seconds, 2)}

        def base_eval():
            evaluation(base, config.seeds[0], out / "base" / "eval")

        try:
            manifest.run("base/general", lambda: general_responses(
                general_file, base, tokenizer, data.general, max_new_tokens=config.eval.forgetting_max_new_tokens,
                backend=backend))
            if "base" in config.methods:
                manifest.run("base/eval", base_eval)
            manifest.run("corpus/original", original_corpus)
            if "hinted" in needed:
                manifest.run("corpus/hinted", hinted_corpus)
            if "pairs" in needed:
                manifest.run("corpus/pairs", pair_corpus)
            for method in config.methods:
                if METHODS[method] is None:
                    continue
                corpus = datasets.load_from_disk(str(corpora / METHODS[method][1]))
                if METHODS[method][1] != "pairs":
                    corpus = training_rows(corpus)
                for seed in config.seeds:
                    _run_cell(config, method, seed, out / "cells" / method / f"seed_{seed}", base_path, tokenizer,
                              corpus, backend, evaluation)
        finally:
            backend.close()
        # One summary, written by the main process and returned by every process.
        return main_decides(summarize(out, config) if state.is_main_process else None)


def _run_cell(config, method, seed, cell: Path, base_path, tokenizer, corpus, backend, evaluation) -> None:
    """Train and evaluate one (method, seed) cell; under N processes the main process decides what
    is finished, writes, and is waited for at the end, so the next cell reads complete files."""
    main = process_state().is_main_process
    if main_decides((cell / "result.json").exists()):
        logger.info("%s seed %d: finished earlier, skipping", method, seed)
        return
    load = dict(dtype=config.model.dtype, device=process_state().device, trust_remote_code=config.model.trust_remote_code)
    checkpoint = cell / "checkpoint"
    timing_file = cell / "train_seconds.json"
    trained = main_decides((checkpoint / DONE_FILE).exists() and timing_file.exists()
                           and any(checkpoint.glob("*.safetensors")))
    if not trained:
        logger.info("%s seed %d: training on %d rows", method, seed, len(corpus))
        train_config = _train_config(config, method, seed)
        trainee, _ = load_model(base_path, **load)
        start = time.perf_counter()
        train(trainee, tokenizer, corpus, train_config, out_dir=checkpoint,
              teacher=_teacher(train_config, base_path, load))
        seconds = time.perf_counter() - start
        if main:
            write_json(timing_file, {"seconds": seconds})
        del trainee
        in_step()
    tuned, _ = load_model(str(checkpoint), **load)
    backend.update_weights(tuned)
    start = time.perf_counter()
    metrics = evaluation(tuned, seed, cell / "eval")
    if main:
        result = {"method": method, "seed": seed, "metrics": metrics, "train_rows": len(corpus),
                  "train_seconds": read_json(timing_file)["seconds"], "eval_seconds": time.perf_counter() - start,
                  "processes": process_state().num_processes}
        write_json(cell / "result.json", result)
        if not config.keep_checkpoints:
            for weights in checkpoint.glob("*.safetensors"):
                weights.unlink()
    in_step()


def _teacher(train_config: TrainConfig, base_path: str, load: dict):
    """The frozen teacher of an objective that can use one (Target-SFT) when the config names it.

    Loaded here because the trainer loads teachers only for objectives that cannot run without
    one, and Target-SFT without a teacher is DFT (docs/methods.md §2).
    """
    objective = build(train_config.objective.name, **train_config.objective.hparams)
    if train_config.teacher is None or "teacher" not in objective.accepts:
        return None
    path = base_path if train_config.teacher == "base" else train_config.teacher
    teacher, _ = load_model(path, **load)
    return teacher.eval().requires_grad_(False)


def _corpus_seconds(method: str, corpus: str, stage: dict) -> float:
    """What building the method's corpus cost: nothing for the original demonstrations; the whole
    rewrite for Hinted Decoding; sampling (+ the cached reference log-probs, for DPO) for pairs,
    leaving out the DDT scoring that is there only for the report."""
    if corpus == "original" or not stage:
        return 0.0
    if corpus == "pairs":
        return stage["sample_seconds"] + (stage["ref_logps_seconds"] if method == "dpo" else 0.0)
    return stage["seconds"]


def score_columns(config: CompareConfig) -> list[tuple[str, str, str, str]]:
    """(row key, split, metric of evaluate(), heading) of each score the table shows: greedy accuracy on
    every split; where evaluation samples n answers per problem, avg@n and pass@k for each k > 1 of
    eval.pass_k (pass@1 is avg@n exactly)."""
    metrics = [("acc", "accuracy", "acc")]
    n = config.eval.n_samples
    if n > 0:
        metrics.append(("avg", f"avg@{n}", f"avg@{n}"))
        metrics += [(f"pass{k}", f"pass@{k}", f"pass@{k}") for k in config.eval.pass_k if 1 < k <= n]
    return [(f"{key}_{split}", split, metric, f"{head} {split}")
            for key, metric, head in metrics for split in config.data.eval_names]


def summarize(out: str | Path, config: CompareConfig) -> dict:
    """One row per method from the finished cells; writes results.json, results.md and compare.png."""
    out = Path(out)
    manifest = Manifest(out / "manifest.json", announce=None)
    splits = config.data.eval_names
    columns = score_columns(config)
    rows = []
    for method in config.methods:
        row: dict[str, Any] = {"method": method}
        if METHODS[method] is None:
            metrics = read_json(out / "base" / "eval" / "metrics.json")
            if metrics is None:
                continue
            cells = [{"metrics": metrics}]
            eval_dirs = [out / "base" / "eval"]
            row["seeds"] = 0  # evaluated once: its ± is the standard error over examples
        else:
            objective, corpus = METHODS[method]
            row.update(objective=objective, corpus=corpus)
            done = [d for s in config.seeds if ((d := out / "cells" / method / f"seed_{s}") / "result.json").exists()]
            cells = [read_json(d / "result.json") for d in done]
            eval_dirs = [d / "eval" for d in done]
            if not cells:
                continue
            row["seeds"] = len(cells)
            stage = manifest.get(f"corpus/{corpus}")
            row["phi_corpus"] = stage.get("phi_mean")
            row["corpus_seconds"] = _corpus_seconds(method, corpus, stage)
            train_seconds, _ = mean_and_se([c["train_seconds"] for c in cells])
            row.update(train_seconds=train_seconds, total_seconds=row["corpus_seconds"] + train_seconds)
        for key, split, metric, _ in columns:
            values = [c["metrics"][split][metric] for c in cells]
            if row["seeds"] == 0:
                row[key], row[f"{key}_se"] = values[0], cells[0]["metrics"][split][f"{metric}_se"]
            else:
                row[key], row[f"{key}_se"] = mean_and_se(values)
        # short answers after training on terse solutions tell format apart from arithmetic
        row["answer_tokens"] = sum(c["metrics"][s]["mean_response_tokens"] for c in cells for s in splits) / (
            len(cells) * len(splits))
        row["answered"] = _answered(eval_dirs, splits)
        row["forgetting_kl"], row["forgetting_kl_se"] = mean_and_se([c["metrics"]["forgetting"]["kl"] for c in cells])
        rows.append(row)
    pairs_stage, hinted_stage = manifest.get("corpus/pairs"), manifest.get("corpus/hinted")
    table = _table(rows, columns)
    notes = list(manifest.data.get("data_notes", []))
    if pairs_stage.get("counts"):
        notes.append(f"Preference pairs (k = {config.pairs.k}, no_pair = {config.pairs.no_pair}): {pairs_stage['counts']}; "
                     f"mean φ of the rejected samples {pairs_stage.get('phi_rejected', float('nan')):.3f}.")
    if hinted_stage.get("sources"):
        notes.append(f"Hinted-Decoding corpus sources: {hinted_stage['sources']}.")
    summary = {"out_dir": str(out), "rows": rows, "table": table, "notes": notes,
               "backend": manifest.data.get("backend"), "backend_note": manifest.data.get("backend_note"),
               "config": to_dict(config)}
    write_json(out / "results.json", summary)
    write_text(out / "results.md", table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    if rows:
        plot(rows, columns, out / "compare.png")
    return summary


def _answered(eval_dirs: list[Path], splits: list[str]) -> float | None:
    """Share of the greedy answers that state a final answer the checker can read (a box or
    '#### N'), from the kept per-problem results; None where a run kept none. A model that never
    states one scores 0 whatever its arithmetic, so accuracy / answered is the accuracy where it tried."""
    stated = []
    for eval_dir in eval_dirs:
        for split in splits:
            path = eval_dir / split / "results.jsonl"
            if not path.exists():
                return None
            stated += [extract_answer(json.loads(line)["response"]) is not None for line in path.read_text().splitlines()]
    return sum(stated) / len(stated) if stated else None


def _table(rows: list[dict], columns: list[tuple[str, str, str, str]]) -> str:
    """Scores ± SE over seeds (base: over examples), mean greedy answer length and share with a
    stated final answer, forgetting, corpus φ under the base model, seconds."""
    head = ["method", "corpus", "seeds"] + [heading for *_, heading in columns]
    head += ["answer tokens", "answered", "forgetting KL", "φ corpus", "corpus s", "train s", "total s"]
    lines = []
    for row in rows:
        cells = [row["method"], row.get("corpus", "–"), str(row["seeds"])]
        cells += [pm(row.get(key), row.get(f"{key}_se")) for key, *_ in columns]
        cells += [num(row["answer_tokens"], 0), num(row["answered"], 2),
                  pm(row.get("forgetting_kl"), row.get("forgetting_kl_se"), 4), num(row.get("phi_corpus"))]
        cells += [num(row.get(k), 0) for k in ("corpus_seconds", "train_seconds", "total_seconds")]
        lines.append(cells)
    return markdown_table(head, lines)


def plot(rows: list[dict], columns: list[tuple[str, str, str, str]], path: Path) -> Path:
    plt = pyplot()
    names = [row["method"] for row in rows]
    x = list(range(len(rows)))
    panels = [(key, heading.replace("acc ", "greedy accuracy: ", 1)) for key, *_, heading in columns]
    panels.append(("forgetting_kl", "forgetting: KL(base ‖ tuned)"))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.8))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(x, [row.get(key, 0.0) for row in rows], yerr=[row.get(f"{key}_se", 0.0) for row in rows], capsize=3,
               color="tab:blue")
        ax.set_title(title)
    ax = axes[-1]
    corpus = [row.get("corpus_seconds", 0.0) for row in rows]
    trained = [row.get("train_seconds", 0.0) for row in rows]
    ax.bar(x, corpus, label="corpus", color="tab:orange")
    ax.bar(x, trained, bottom=corpus, label="training (mean over seeds)", color="tab:green")
    ax.set_title("compute time per method (s)")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path
