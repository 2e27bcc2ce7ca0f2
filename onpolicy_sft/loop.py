"""The on-policy loop (docs/methods.md §6) beside its baseline, both from the same starting model M_0.

Round r of the on-policy arm: its model M_{r−1} rewrites the ORIGINAL corpus with Hinted Decoding,
the result is DDT-scored under M_{r−1}, M_{r−1} is trained on it (IDFT by default) into M_r, and M_r
is evaluated. The baseline arm trains its own M_{r−1} on the original demonstrations (SFT by
default) with the same train settings, hence the same optimizer steps, and is evaluated the same
way. Evaluation is accuracy on every evaluation set and forgetting against M_0. Layout:

    out_dir/config.yaml, fingerprint.json, manifest.json, run.log (from the CLI)
    out_dir/base/general_responses.json     M_0's answers to the general prompts (forgetting text)
    out_dir/round_0/eval/                   M_0 evaluated (when eval_base)
    out_dir/round_r/onpolicy/{corpus,ddt,checkpoint,eval}/
    out_dir/round_r/baseline/{ddt,checkpoint,eval}/
    out_dir/round_r/onpolicy/corpus/blocks/block_<b>/{dataset,stats.json}   (online mode)
    out_dir/summary.md, summary.json, summary.png (accuracy, forgetting), phi_hist.png

Online mode (``config.online``, docs/methods.md §6): the on-policy arm's rewrite happens inside its
training, one block of rows before every steps_per_rewrite steps, with the weights of that step
(``train_online``, ``BlockRewriter``); the blocks then make the round's corpus (``collect_blocks``),
scored and reported as an offline round's. The training run resumes at its saved state as any run.
Its train time includes the rewrites; the mean seconds per block of the weight sync and of the
rewrite are in the summary row's ``online``.

A killed loop resumes when run again: finished stages are skipped, their artefacts read back. A
rerun whose inputs (config without display fields, data, model) differ from the first run's is
refused, naming what differs; one directory serves one run at a time. One generation backend lives
for the whole loop: it sleeps while a model trains (vLLM's sleep mode frees the GPU; a no-op where
there is none) and is woken with the next stage's weights in place (``Backend.wake_up``), which
experiments/benchmarks/vllm_weight_swap.py measured to be far cheaper than a new engine.

Each stage is a plain function of what the loop shares (``Loop``) and of an arm's round (``Arm``);
``run_rounds`` and ``run_arm`` run them in order through the record (``manifest.Manifest``).

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) every process runs every stage with
its own model and backend on its own device, each stage splitting its rows across the processes,
and every process returns what one process would have; only the main process takes the lock and
writes (onpolicy_sft/run.py). manifest.json records how many processes ran each stage.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch

from onpolicy_sft import ddt, ddt_report
from onpolicy_sft.config import LoopConfig, run_rewrite_config
from onpolicy_sft.config_io import save_config, to_dict
from onpolicy_sft.console import say
from onpolicy_sft.evaluate import evaluate_model, general_responses
from onpolicy_sft.fingerprint import config_fingerprint, model_identity
from onpolicy_sft.manifest import Manifest
from onpolicy_sft.models import load_model, resolve_model_path
from onpolicy_sft.rewrite import rewrite_corpus
from onpolicy_sft.rewrite_config import without_added_defaults
from onpolicy_sft.report import (SOURCES, markdown_table, num, phi_by_source, plot_histograms, plot_lines, pm,
                                 source_counts)
from onpolicy_sft.run import RunDir, is_main, on_main, process_state, save_dataset
from onpolicy_sft.run_data import RunData, load_data, training_rows
from onpolicy_sft.rundir import read_json, write_json, write_text
from onpolicy_sft.serving import Served, open_backend
from onpolicy_sft.train import train
from onpolicy_sft.train_data import Blocks

ARMS = ("onpolicy", "baseline")
STAGES = ("rewrite", "ddt", "train", "eval")
# Fields that change no finished stage's result: a resume may change them (more rounds, the baseline
# switched on, the display).
DISPLAY = ("out_dir", "rounds", "eval_base", "baseline.enabled", "train.progress", "train.trackers", "train.log_every",
           "rewrite.progress", "rewrite.model_name")
GENERAL = Path("base") / "general_responses.json"


@dataclass
class Loop:
    """What every stage of a loop reads: its config, output directory and record, the data, the
    starting model M_0 and the one backend with the weights it serves."""

    config: LoopConfig
    run: RunDir
    manifest: Manifest
    data: RunData
    base_path: str
    base: Any
    tokenizer: Any
    backend: Any
    served: Served

    @property
    def load(self) -> dict:
        return self.config.model.load_options(process_state().device)


@dataclass
class Arm:
    """One arm's round: its model M_{r−1} (``model``, saved at ``path``) and where the round goes."""

    round: int
    name: str
    model: Any
    path: str

    @property
    def stage(self) -> str:
        return f"round_{self.round}/{self.name}"

    @property
    def folder(self) -> Path:
        """The round's folder, relative to the output directory."""
        return Path(self.stage)

    @property
    def weights(self) -> str:
        """Which weights M_{r−1} is to the backend: M_0, or the arm's previous round."""
        return "base" if self.round == 1 else f"{self.name}/{self.round - 1}"



def run_loop(config: LoopConfig) -> dict:
    """Run (or resume) the loop and its baseline; returns the summary (rows per round and arm, table)."""
    with RunDir(config.out_dir, "loop") as run:
        loop = start(config, run)
        try:
            run_rounds(loop)
        finally:
            loop.backend.close()
        # One summary, written by the main process and returned by every process.
        return on_main(partial(summarize_loop, run.path, config, loop.manifest))


def start(config: LoopConfig, run: RunDir) -> Loop:
    """The data, M_0, the fingerprint (a resume with other inputs is refused before anything is
    written), config.yaml, the record and the backend."""
    data = load_data(config.data)
    base_path = resolve_model_path(config.model.name)
    # Loaded before the fingerprint is recorded, so a missing model is not recorded as the run's.
    base, tokenizer = load_model(base_path, **config.model.load_options(process_state().device))
    run.check_inputs(loop_inputs(config, data, base_path))
    on_main(partial(save_config, config, run.file("config.yaml")))
    manifest = Manifest(run.file("manifest.json"))
    manifest.data.update(config=to_dict(config), data_notes=data.notes)
    for note in data.notes:
        say(note)
    backend, note = open_backend(config.backend, base, tokenizer, config.backend_options,
                                 trust_remote_code=config.model.trust_remote_code)
    manifest.data.update(backend=backend.name, backend_note=note)
    manifest.save()
    return Loop(config, run, manifest, data, base_path, base, tokenizer, backend, Served(backend, "base", manifest))


def loop_inputs(config: LoopConfig, data: RunData, base_path: str) -> dict:
    """What the loop's results depend on: the config less ``DISPLAY``, the data and M_0."""
    # Rewrite settings added later count only when set, so runs recorded before them still resume.
    settings = without_added_defaults(config_fingerprint(config, DISPLAY), prefix="rewrite.")
    if not config.online.enabled:  # off, it is no input: runs recorded before online mode still resume
        settings = {k: v for k, v in settings.items() if not k.startswith("online.")}
    return {**settings, "data": data.digest(), **model_identity(base_path)}


def run_rounds(loop: Loop) -> None:
    """M_0's general answers (and its evaluation), then round after round every arm, each from its
    own model of the round before."""
    manifest, config = loop.manifest, loop.config
    manifest.run("base/general", partial(general_answers, loop))
    if config.eval_base:
        manifest.run("round_0/eval", partial(evaluate_stage, loop, "base", loop.base, Path("round_0") / "eval"))
    arms = ARMS if config.baseline.enabled else ARMS[:1]
    current = {arm: (loop.base, loop.base_path) for arm in arms}
    for r in range(1, config.rounds + 1):
        for name in arms:
            current[name] = run_arm(loop, Arm(r, name, *current[name]))


def run_arm(loop: Loop, arm: Arm) -> tuple[Any, str]:
    """One arm's round, stage by stage; returns its trained model M_r and where it is saved."""
    manifest = loop.manifest
    if arm.name == "onpolicy" and loop.config.online.enabled:
        # Online: the rewrite happens inside training, block by block; the blocks then make the
        # round's corpus, scored and reported as an offline round's.
        manifest.run(f"{arm.stage}/train", partial(train_online, loop, arm))
        manifest.run(f"{arm.stage}/rewrite", partial(collect_blocks, loop.run, arm.folder / "corpus"))
        manifest.run(f"{arm.stage}/ddt", partial(score, loop, arm))
    else:
        if arm.name == "onpolicy":
            manifest.run(f"{arm.stage}/rewrite", partial(rewrite, loop, arm))
        manifest.run(f"{arm.stage}/ddt", partial(score, loop, arm))
        manifest.run(f"{arm.stage}/train", partial(fit, loop, arm))
    checkpoint = loop.run.file(arm.folder / "checkpoint")
    tuned, _ = load_model(str(checkpoint), **loop.load)
    evaluation = partial(evaluate_stage, loop, f"{arm.name}/{arm.round}", tuned, arm.folder / "eval")
    manifest.run(f"{arm.stage}/eval", evaluation)
    return tuned, str(checkpoint)


# ---------------------------------------------------------------------------------------------
# The stages


def general_answers(loop: Loop) -> None:
    """M_0's greedy answers to the general prompts: the text forgetting is measured on."""
    general_responses(loop.run.file(GENERAL), loop.base, loop.tokenizer, loop.data.general,
                      max_new_tokens=loop.config.eval.forgetting_max_new_tokens, backend=loop.backend)


def evaluate_stage(loop: Loop, weights: str, model, folder: Path) -> None:
    """``model`` (to the backend: ``weights``) evaluated, every answer and the metrics in ``folder``."""
    out_dir = loop.run.file(folder)
    loop.served.ensure(weights, model, str(out_dir))
    evaluate_model(model, loop.tokenizer, loop.data.evals, loop.config.eval, backend=loop.backend, base=loop.base,
                   general_file=loop.run.file(GENERAL), out_dir=out_dir)


def rewrite(loop: Loop, arm: Arm) -> dict:
    """The on-policy arm's corpus: M_{r−1} rewrites the original demonstrations with Hinted Decoding."""
    corpus_dir = arm.folder / "corpus"
    loop.served.ensure(arm.weights, arm.model, f"{arm.stage}/rewrite")
    corpus, stats = rewrite_corpus(arm.model, loop.tokenizer, loop.data.train, run_rewrite_config(loop.config),
                                   out_dir=loop.run.file(corpus_dir), backend=loop.backend)
    if len(corpus) == 0:
        raise RuntimeError(f"round {arm.round}: the rewrite kept no rows (fallback 'drop' and nothing verified)")
    save_dataset(loop.run, corpus_dir / "dataset", corpus)
    return {"rows": len(corpus), "sources": source_counts(corpus), "stats": stats}


def score(loop: Loop, arm: Arm) -> dict:
    """The arm's training corpus DDT-scored under M_{r−1}: the on-policy arm's rewrite beside the
    original demonstrations, the baseline's original demonstrations; with the report."""
    model, tokenizer = arm.model, loop.tokenizer
    if arm.name == "onpolicy":
        corpus = datasets.load_from_disk(str(loop.run.file(arm.folder / "corpus" / "dataset")))
        scored = corpus if "ddt_phi_mean" in corpus.column_names else ddt.score(
            model, tokenizer, corpus, progress=False)
        corpora = {"rewritten": scored, "original": _original_scores(model, tokenizer, loop.data.train, scored)}
    else:
        scored = ddt.score(model, tokenizer, loop.data.train)
        corpora = {"original": scored}
    summary = {label: ddt.summarize(ds) for label, ds in corpora.items()}
    ddt_dir = arm.folder / "ddt"
    save_dataset(loop.run, ddt_dir / "dataset", scored)
    on_main(partial(ddt_report.write_report, loop.run.file(ddt_dir), corpora))
    loop.run.write_json(ddt_dir / "summary.json", summary)
    return {"training_corpus": phi_by_source(scored), "phi_original": summary["original"]["phi_mean"]}


def fit(loop: Loop, arm: Arm) -> dict:
    """M_{r−1} trained into M_r on the scored corpus, with the arm's objective and the shared settings."""
    loop.served.sleep()
    trainee, _ = load_model(arm.path, **loop.load)
    corpus = training_rows(datasets.load_from_disk(str(loop.run.file(arm.folder / "ddt" / "dataset"))))
    objective = loop.config.train.objective if arm.name == "onpolicy" else loop.config.baseline.objective
    train(trainee, loop.tokenizer, corpus, dataclasses.replace(loop.config.train, objective=objective),
          out_dir=loop.run.file(arm.folder / "checkpoint"))
    return {"from": str(arm.path), "objective": objective.name, "rows": len(corpus)}


def train_online(loop: Loop, arm: Arm) -> dict:
    """The on-policy arm's training in online mode (``OnlineConfig``): from M_{r−1}, one run over the
    round's steps and schedule whose every block of steps_per_rewrite steps trains on rows that the
    weights of the block's first step rewrote (``BlockRewriter``)."""
    config, corpus = loop.config, loop.data.train
    loop.served.sleep()
    trainee, _ = load_model(arm.path, **loop.load)
    blocks = Blocks(steps=config.online.steps_per_rewrite, rows=BlockRewriter(loop, arm.folder / "corpus" / "blocks"),
                    settings={"online.rows_per_rewrite": config.online.rows_per_rewrite,
                              "rewrite": run_rewrite_config(config).fingerprint()})
    # ``corpus`` sizes the run as an offline round on it would be: the same steps and schedule.
    train(trainee, loop.tokenizer, training_rows(corpus), config.train,
          out_dir=loop.run.file(arm.folder / "checkpoint"), blocks=blocks)
    return {"from": str(arm.path), "objective": config.train.objective.name, "rows": len(corpus),
            "online": dataclasses.asdict(config.online)}


class BlockRewriter:
    """Block b's training rows: corpus rows [b·R, (b+1)·R) (R = rows_per_rewrite, at most the corpus;
    wrapping round) rewritten by the model in training, served by the backend with its current
    weights. Each block is saved once it is whole (``block_<b>/dataset`` and ``stats.json``, with the
    seconds of the weight sync and of the rewrite) and read back on a resume, since the weights of a
    resumed run may be past the block's first step. Nothing else is written while training runs."""

    def __init__(self, loop: Loop, folder: Path):
        self.loop, self.folder = loop, folder

    def rows_of(self, index: int) -> list[int]:
        n = len(self.loop.data.train)
        size = min(self.loop.config.online.rows_per_rewrite, n)
        return [(index * size + i) % n for i in range(size)]

    def __call__(self, index: int, model):
        run, block = self.loop.run, self.folder / f"block_{index:04d}"
        if run.exists(block / "dataset"):
            return training_rows(datasets.load_from_disk(str(run.file(block / "dataset"))))
        model.eval()  # no dropout in the rewrite; training goes on in training mode
        try:
            # Its own RNG streams: training draws the same whether a block is rewritten or read back.
            with torch.random.fork_rng():
                corpus, stats = self._rewrite(index, model)
        finally:
            model.train()
        if len(corpus) == 0:
            raise RuntimeError(f"online block {index}: the rewrite kept no rows (fallback 'drop' and nothing verified)")
        run.write_json(block / "stats.json", stats)
        save_dataset(run, block / "dataset", corpus)
        return training_rows(corpus)

    def _rewrite(self, index: int, model):
        loop, where = self.loop, self.loop.run.file(self.folder)
        start = time.perf_counter()
        loop.served.ensure(f"online/{where}/{index}", model, f"{where}/block_{index}")
        synced = time.perf_counter()
        corpus, stats = rewrite_corpus(model, loop.tokenizer, loop.data.train.select(self.rows_of(index)),
                                       run_rewrite_config(loop.config), backend=loop.backend)
        loop.served.sleep()  # the accelerator goes back to the trainer
        stats["seconds_sync"], stats["seconds_rewrite"] = synced - start, time.perf_counter() - synced
        return corpus, stats


def collect_blocks(run: RunDir, corpus_dir: Path) -> dict:
    """The round's corpus in online mode: every block's rows in order, saved as an offline round's
    corpus; with the sources and the mean seconds per block of the weight sync and of the rewrite."""
    folders = sorted(run.file(corpus_dir / "blocks").glob("block_*"))
    corpus = datasets.concatenate_datasets([datasets.load_from_disk(str(f / "dataset")) for f in folders])
    stats = [read_json(f / "stats.json") for f in folders]
    save_dataset(run, corpus_dir / "dataset", corpus)
    online = {"blocks": len(folders), "rows_per_block": [s["rows"] for s in stats]}
    for key in ("seconds_sync", "seconds_rewrite"):
        online[f"mean_{key}"] = sum(s[key] for s in stats) / len(stats)
    return {"rows": len(corpus), "sources": source_counts(corpus), "stats": {"online": online}}


def _original_scores(model, tokenizer, original, corpus):
    """The original corpus scored under the same model. The rewrite already scored the original of
    every row it kept (ddt_original_*); reuse those when it kept every row, else score afresh."""
    prefix = "ddt_original_"
    reused = [c for c in corpus.column_names if c.startswith(prefix)]
    if reused and len(corpus) == len(original) and "original_response" in corpus.column_names:
        scores = corpus.select_columns(reused + ["prompt", "original_response"])
        scores = scores.rename_columns({c: "ddt_" + c[len(prefix):] for c in reused})
        return scores.rename_column("original_response", "response")
    return ddt.score(model, tokenizer, original, progress=False)


def summarize_loop(out: Path, config: LoopConfig, manifest: Manifest | None = None) -> dict:
    """One row per round and arm: corpus sources, mean φ of the training corpus and mean |φ̄| per
    source, accuracy ± se per evaluation set, forgetting ± se, stage times. Writes summary.md/.json,
    summary.png and phi_hist.png."""
    out = Path(out)
    manifest = manifest or Manifest(out / "manifest.json", announce=None)
    evals = config.data.eval_names
    arms = ARMS if config.baseline.enabled else ARMS[:1]
    labels = {"onpolicy": f"on-policy ({config.train.objective.name}, rewritten)",
              "baseline": f"baseline ({config.baseline.objective.name}, original)"}
    rows = []
    for r in range(0, config.rounds + 1):
        for arm in (("base",) if r == 0 else arms):
            stage = "round_0" if r == 0 else f"round_{r}/{arm}"
            metrics = read_json(out / stage / "eval" / "metrics.json")
            if metrics is None:
                continue
            row = {"round": r, "arm": arm, "label": "base model" if r == 0 else labels[arm]}
            if r > 0:
                rewrite = manifest.get(f"{stage}/rewrite")
                corpus = manifest.get(f"{stage}/ddt").get("training_corpus", {})
                row["sources"] = rewrite.get("sources") or {"self": 0, "hinted": 0, "original": corpus.get("rows", 0)}
                row.update({k: corpus.get(k) for k in ("phi_mean", "abs_phi_self", "abs_phi_hinted", "abs_phi_original")})
                row["phi_original"] = manifest.get(f"{stage}/ddt").get("phi_original")
                row["train_from"] = manifest.get(f"{stage}/train").get("from")
                if "online" in rewrite.get("stats", {}):
                    row["online"] = rewrite["stats"]["online"]
            for name in evals:
                row[f"acc_{name}"], row[f"acc_{name}_se"] = metrics[name]["accuracy"], metrics[name]["accuracy_se"]
            row["forgetting_kl"], row["forgetting_kl_se"] = metrics["forgetting"]["kl"], metrics["forgetting"]["kl_se"]
            for s in STAGES:
                entry = manifest.get(f"{stage}/{s}")
                if entry:
                    row[f"seconds_{s}"], row[f"attempts_{s}"] = entry["seconds"], entry.get("attempts", 1)
            rows.append(row)
    table = _table(rows, evals, manifest, triage=config.rewrite.triage.by != "off")
    summary = {"out_dir": str(out), "backend": manifest.data.get("backend"), "backend_note": manifest.data.get("backend_note"),
               "data_notes": manifest.data.get("data_notes", []), "rounds": rows, "table": table,
               "weight_updates": manifest.data.get("weight_updates", [])}
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", table + "\n")
    if rows:
        _plot_rounds(rows, evals, labels, out / "summary.png")
        _plot_phi(out, config, out / "phi_hist.png")
    return summary


def _table(rows: list[dict], evals: list[str], manifest: Manifest, triage: bool = False) -> str:
    # The in_distribution source (rows the DDT triage kept as they are) only exists with the triage on.
    shown = SOURCES if triage else SOURCES[:3]
    head = ["round", "arm", f"corpus {'/'.join(shown)}", "φ corpus", "φ original", "abs φ̄ self", "abs φ̄ hinted",
            "abs φ̄ original"] + [f"acc {name}" for name in evals] + ["forgetting KL"] + [f"{s} s" for s in STAGES]
    lines = []
    for row in rows:
        stage = "round_0" if row["round"] == 0 else f"round_{row['round']}/{row['arm']}"
        sources = row.get("sources")
        cells = [str(row["round"]), row["label"],
                 "–" if not sources else "/".join(str(sources.get(s, 0)) for s in shown),
                 num(row.get("phi_mean")), num(row.get("phi_original")), num(row.get("abs_phi_self")),
                 num(row.get("abs_phi_hinted")), num(row.get("abs_phi_original"))]
        cells += [pm(row.get(f"acc_{name}"), row.get(f"acc_{name}_se")) for name in evals]
        cells.append(pm(row.get("forgetting_kl"), row.get("forgetting_kl_se"), 4))
        cells += [manifest.seconds(f"{stage}/{s}") for s in STAGES]
        lines.append(cells)
    return markdown_table(head, lines)


def _plot_rounds(rows: list[dict], evals: list[str], labels: dict, path: Path) -> Path:
    """Accuracy per evaluation set and forgetting, per round, one line per arm (both from round 0)."""
    base = [row for row in rows if row["round"] == 0]
    panels = []
    for key, title in [(f"acc_{name}", f"greedy accuracy: {name}") for name in evals] + [
            ("forgetting_kl", "forgetting: KL(base ‖ tuned) per token")]:
        series = {}
        for arm, label in labels.items():
            points = [(row["round"], row[key], row[f"{key}_se"]) for row in base + [r for r in rows if r["arm"] == arm]]
            if len(points) > len(base):
                series[label] = points
        panels.append((title, series))
    return plot_lines(panels, path, xlabel="round")


def _plot_phi(out: Path, config: LoopConfig, path: Path) -> Path | None:
    """Per round, the per-row mean φ of the original demonstrations and of the rewritten corpus,
    both under the on-policy arm's model of that round."""
    panels = {}
    for r in range(1, config.rounds + 1):
        scored = out / f"round_{r}" / "onpolicy" / "ddt" / "dataset"
        if not scored.exists():
            continue
        corpus = datasets.load_from_disk(str(scored))
        series = {}
        if "ddt_original_phi_mean" in corpus.column_names:
            series["original"] = [float(v) for v in corpus["ddt_original_phi_mean"]]
        series["rewritten"] = [float(v) for v in corpus["ddt_phi_mean"]]
        panels[f"round {r}: per-row mean φ"] = series
    return plot_histograms(panels, path, xlabel="φ̄ (0: the model's own writing)") if panels else None


def print_summary(summary: dict) -> None:
    """The end of a run on the console: notes, the table, where everything is."""
    if not is_main():
        return
    if summary.get("backend_note"):
        say(summary["backend_note"])
    print(summary["table"])
    print(f"\nsummary.md, summary.png, phi_hist.png and every stage's artefacts: {summary['out_dir']}")
