"""The side-by-side comparison the two papers make (docs/methods.md §6), on the same prompts and budget.

Methods (each trained from the same base model with the same ``train`` settings, hence the same
optimizer steps per example, unless ``train_overrides`` says otherwise):

    base                        the starting model, evaluated once (greedy decoding is deterministic)
    sft, dft, target_sft, idft  on the original demonstrations
    hd_sft, hd_idft             on the Hinted-Decoding rewrite of the same prompts (onpolicy_sft.rewrite)
    dpo, simpo                  DPO@k / SimPO@k on pairs from k base-model samples per prompt

The training corpora are built once, by the base model, so every seed of every method sees the
same prompts and the same samples; the seeds vary the training run (data order) and the sampling
seed of evaluation. Each (method, seed) cell writes ``cells/<method>/seed_<s>/result.json`` when
it finishes; running the comparison again skips finished cells and finished corpus stages.

A rerun whose inputs (config without display fields, data, base model; ``compare_inputs``) differ
from the first run's is refused, naming what differs; one directory serves one comparison at a time.

Layout of out_dir: config.yaml, fingerprint.json, manifest.json (corpus stages and their wall times),
base/{general_responses.json, eval/metrics.json, eval/<split>/results.jsonl}, corpora/{original,hinted,pairs}/,
cells/<method>/seed_<s>/{result.json, eval/<split>/results.jsonl}, results.json, results.md, compare.png.
The results.jsonl files keep every greedy answer, so a score can be traced to the text behind it.

Each stage and each step of a cell is a plain function of what the comparison shares
(``Comparison``), run in order by ``build_corpora`` and ``run_cell``.

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) every process runs every stage and
cell, the stages splitting their rows across the processes; the main process alone takes the lock,
decides what is finished and writes (onpolicy_sft/run.py), and every process returns its summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from decoding.sampling import SamplingConfig
from onpolicy_sft import ddt
from onpolicy_sft.compare_config import METHODS, CompareConfig
from onpolicy_sft.config import ObjectiveConfig, TrainConfig, run_rewrite_config
from onpolicy_sft.config_io import save_config, to_dict
from onpolicy_sft.evaluate import evaluate_model, general_responses, mean_and_se
from onpolicy_sft.fingerprint import config_fingerprint, model_identity
from onpolicy_sft.grading import extract_answer
from onpolicy_sft.manifest import Manifest
from onpolicy_sft.models import load_model, resolve_model_path
from onpolicy_sft.objectives import build
from onpolicy_sft.preference_pairs import add_reference_logps, build_pairs
from onpolicy_sft.report import markdown_table, num, pm, pyplot, source_counts
from onpolicy_sft.rewrite import rewrite_corpus
from onpolicy_sft.run import RunDir, in_step, main_decides, on_main, process_state, save_dataset
from onpolicy_sft.run_data import RunData, load_data, training_rows
from onpolicy_sft.rundir import read_json, replace_with, write_json, write_text
from onpolicy_sft.serving import open_backend
from onpolicy_sft.train import train
from onpolicy_sft.train_state import DONE_FILE

logger = logging.getLogger(__name__)

# Fields that change no finished stage's or cell's result: a resume may change them (more seeds or
# methods, the display). The base model's evaluation seed, the first seed, is an input of its own.
DISPLAY = ("out_dir", "seeds", "methods", "keep_checkpoints", "train.progress", "train.trackers", "train.log_every",
           "rewrite.progress", "rewrite.model_name")
CORPORA = Path("corpora")
GENERAL = Path("base") / "general_responses.json"
TRAIN_SECONDS = "train_seconds.json"


def _mean_phi(dataset) -> float:
    values = list(dataset["ddt_phi_mean"])
    return float(sum(values) / len(values)) if values else float("nan")


def _train_config(config: CompareConfig, method: str, seed: int) -> TrainConfig:
    objective = ObjectiveConfig(name=METHODS[method][0], hparams=dict(config.hparams.get(method, {})))
    return dataclasses.replace(config.train, seed=seed, objective=objective, **config.train_overrides.get(method, {}))


@dataclass
class Comparison:
    """What every stage and cell of a comparison reads: its config, output directory and record, the
    data, the base model and the one backend."""

    config: CompareConfig
    run: RunDir
    manifest: Manifest
    data: RunData
    base_path: str
    base: Any
    tokenizer: Any
    backend: Any

    @property
    def load(self) -> dict:
        return self.config.model.load_options(process_state().device)



def run_comparison(config: CompareConfig) -> dict:
    """Run (or resume) every (method, seed) cell; returns the summary (rows, markdown table, paths)."""
    with RunDir(config.out_dir, "comparison") as run:
        comparison = start(config, run)
        try:
            build_corpora(comparison)
            for method in config.methods:
                if METHODS[method] is not None:
                    run_method(comparison, method)
        finally:
            comparison.backend.close()
        # One summary, written by the main process and returned by every process.
        return on_main(partial(summarize, run.path, config))


def start(config: CompareConfig, run: RunDir) -> Comparison:
    """The data, the base model, the fingerprint (a resume with other inputs is refused before
    anything is written), config.yaml, the record and the backend."""
    data = load_data(config.data)
    base_path = resolve_model_path(config.model.name)
    base, tokenizer = load_model(base_path, **config.model.load_options(process_state().device))
    run.check_inputs(compare_inputs(config, data, base_path))
    on_main(partial(save_config, config, run.file("config.yaml")))
    manifest = Manifest(run.file("manifest.json"))
    backend, note = open_backend(config.backend, base, tokenizer, config.backend_options,
                                 trust_remote_code=config.model.trust_remote_code)
    manifest.data.update(backend=backend.name, backend_note=note, data_notes=data.notes)
    manifest.save()
    return Comparison(config, run, manifest, data, base_path, base, tokenizer, backend)


def compare_inputs(config: CompareConfig, data: RunData, base_path: str) -> dict:
    """What the comparison's results depend on: the config less ``DISPLAY``, the seed the base
    model is evaluated with, the data and the base model."""
    return {**config_fingerprint(config, DISPLAY), "base_eval_seed": config.seeds[0], "data": data.digest(),
            **model_identity(base_path)}


def build_corpora(comparison: Comparison) -> None:
    """The base model's general answers and evaluation, and every training corpus a method needs."""
    manifest, methods = comparison.manifest, comparison.config.methods
    manifest.run("base/general", partial(general_answers, comparison))
    if "base" in methods:
        manifest.run("base/eval", partial(evaluate_base, comparison))
    manifest.run("corpus/original", partial(original_corpus, comparison))
    needed = {METHODS[m][1] for m in methods if METHODS[m] is not None}
    if "hinted" in needed:
        manifest.run("corpus/hinted", partial(hinted_corpus, comparison))
    if "pairs" in needed:
        manifest.run("corpus/pairs", partial(pair_corpus, comparison))


def run_method(comparison: Comparison, method: str) -> None:
    """Every seed's cell of ``method``, on the method's corpus."""
    corpus = datasets.load_from_disk(str(comparison.run.file(CORPORA / METHODS[method][1])))
    if METHODS[method][1] != "pairs":
        corpus = training_rows(corpus)
    for seed in comparison.config.seeds:
        run_cell(comparison, method, seed, corpus)


# ---------------------------------------------------------------------------------------------
# The base model and the corpora


def general_answers(comparison: Comparison) -> None:
    """The base model's greedy answers to the general prompts: the text forgetting is measured on."""
    c = comparison
    general_responses(c.run.file(GENERAL), c.base, c.tokenizer, c.data.general,
                      max_new_tokens=c.config.eval.forgetting_max_new_tokens, backend=c.backend)


def evaluation(comparison: Comparison, model, seed: int, folder: Path) -> dict:
    """``model`` evaluated with sampling seed ``seed``, every answer and the metrics in ``folder``."""
    c = comparison
    return evaluate_model(model, c.tokenizer, c.data.evals, dataclasses.replace(c.config.eval, seed=seed),
                          backend=c.backend, base=c.base, general_file=c.run.file(GENERAL), out_dir=c.run.file(folder))


def evaluate_base(comparison: Comparison) -> None:
    """The base model, evaluated once (with the first seed)."""
    evaluation(comparison, comparison.base, comparison.config.seeds[0], Path("base") / "eval")


def original_corpus(comparison: Comparison) -> dict:
    """The original demonstrations, DDT-scored under the base model."""
    c = comparison
    scored = ddt.score(c.base, c.tokenizer, c.data.train, progress=False)
    save_dataset(c.run, CORPORA / "original", scored)
    return {"rows": len(scored), "phi_mean": _mean_phi(scored)}


def hinted_corpus(comparison: Comparison) -> dict:
    """The base model's Hinted-Decoding rewrite of the demonstrations, DDT-scored."""
    c = comparison
    corpus, stats = rewrite_corpus(c.base, c.tokenizer, c.data.train, run_rewrite_config(c.config),
                                   out_dir=c.run.file(CORPORA / "hinted_shards"), backend=c.backend)
    if "ddt_phi_mean" not in corpus.column_names:
        corpus = ddt.score(c.base, c.tokenizer, corpus, progress=False)
    save_dataset(c.run, CORPORA / "hinted", corpus)
    return {"rows": len(corpus), "phi_mean": _mean_phi(corpus), "sources": source_counts(corpus), "stats": stats}


def pair_corpus(comparison: Comparison) -> dict:
    """Preference pairs from k base-model samples per prompt, with the reference log-probs cached and
    both sides DDT-scored for the report."""
    c, p = comparison, comparison.config.pairs
    sampling = SamplingConfig(temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens)
    start = time.perf_counter()
    pairs, counts = build_pairs(c.base, c.tokenizer, c.data.train, k=p.k, backend=c.backend, sampling=sampling,
                                no_pair=p.no_pair, seed=c.config.data.seed)
    if len(pairs) == 0:
        raise ValueError(f"no preference pairs could be built ({counts}); raise pairs.k or use no_pair=demonstration")
    sample_seconds = time.perf_counter() - start
    start = time.perf_counter()
    pairs = add_reference_logps(c.base, c.tokenizer, pairs, max_length=c.config.train.max_length)
    ref_seconds = time.perf_counter() - start
    phi = {}
    for side in ("chosen", "rejected"):
        scored = ddt.score(c.base, c.tokenizer, pairs.select_columns(["prompt", "system", side, f"{side}_truncated"]),
                           progress=False, response_column=side)
        phi[side] = _mean_phi(scored)
    save_dataset(c.run, CORPORA / "pairs", pairs)
    return {"rows": len(pairs), "counts": counts, "phi_mean": phi["chosen"], "phi_rejected": phi["rejected"],
            "sample_seconds": round(sample_seconds, 2), "ref_logps_seconds": round(ref_seconds, 2)}


# ---------------------------------------------------------------------------------------------
# The cells


def run_cell(comparison: Comparison, method: str, seed: int, corpus) -> None:
    """Train and evaluate one (method, seed) cell unless it finished; under N processes the main
    process decides what is finished and writes, and is waited for after each step, so the next
    step reads complete files."""
    cell = Path("cells") / method / f"seed_{seed}"
    if comparison.run.exists(cell / "result.json"):
        logger.info("%s seed %d: finished earlier, skipping", method, seed)
        return
    if not _trained(comparison.run, cell):
        train_cell(comparison, method, seed, corpus, cell)
    evaluate_cell(comparison, method, seed, corpus, cell)


def _trained(run: RunDir, cell: Path) -> bool:
    """Whether the cell's training finished with its weights and its time still there."""
    checkpoint = run.file(cell / "checkpoint")
    return main_decides((checkpoint / DONE_FILE).exists() and run.file(cell / TRAIN_SECONDS).exists()
                        and any(checkpoint.glob("*.safetensors")))


def train_cell(comparison: Comparison, method: str, seed: int, corpus, cell: Path) -> None:
    """The base model trained with the method's objective and the cell's seed; its time recorded."""
    c = comparison
    logger.info("%s seed %d: training on %d rows", method, seed, len(corpus))
    train_config = _train_config(c.config, method, seed)
    trainee, _ = load_model(c.base_path, **c.load)
    start = time.perf_counter()
    train(trainee, c.tokenizer, corpus, train_config, out_dir=c.run.file(cell / "checkpoint"),
          teacher=_teacher(train_config, c.base_path, c.load))
    c.run.write_json(cell / TRAIN_SECONDS, {"seconds": time.perf_counter() - start})
    in_step()


def evaluate_cell(comparison: Comparison, method: str, seed: int, corpus, cell: Path) -> None:
    """The trained cell evaluated, its result written (which marks it finished) and, unless the
    config keeps them, its weights deleted."""
    c = comparison
    checkpoint = c.run.file(cell / "checkpoint")
    tuned, _ = load_model(str(checkpoint), **c.load)
    c.backend.update_weights(tuned)
    start = time.perf_counter()
    metrics = evaluation(c, tuned, seed, cell / "eval")
    c.run.write_json(cell / "result.json", {
        "method": method, "seed": seed, "metrics": metrics, "train_rows": len(corpus),
        "train_seconds": c.run.read_json(cell / TRAIN_SECONDS)["seconds"], "eval_seconds": time.perf_counter() - start,
        "processes": process_state().num_processes})
    if not c.config.keep_checkpoints:
        on_main(partial(_drop_weights, checkpoint))
    in_step()


def _drop_weights(checkpoint: Path) -> None:
    for weights in checkpoint.glob("*.safetensors"):
        weights.unlink()


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
