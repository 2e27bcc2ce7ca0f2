"""The on-policy loop (METHODS.md §6): rewrite → DDT score → train → evaluate, round after round.

Round r starts from M_{r−1} (M_0 is the base model): M_{r−1} rewrites the ORIGINAL corpus with
Hinted Decoding, the result is DDT-scored under M_{r−1}, M_{r−1} is trained on it into M_r, and
M_r is evaluated (accuracy on every eval split, forgetting against M_0). Layout:

    out_dir/manifest.json                 what finished, with wall times
    out_dir/base/general_responses.json   M_0's answers to the general prompts (forgetting text)
    out_dir/round_0/eval/                 M_0 evaluated (when eval_base)
    out_dir/round_r/{corpus,ddt,checkpoint,eval}/
    out_dir/summary.md, summary.json, summary.png

A killed loop is resumed by running it again: finished stages are skipped, their artefacts read
back. One generation backend lives for the whole loop; after training it is switched to the new
weights in place (``Backend.update_weights``). On this 2-core CPU that took 1.3 s from the
in-memory model (0.8 s from the saved checkpoint) against 9.5 s for a new engine on the
checkpoint (experiments/benchmarks/vllm_weight_swap.py); either in-place way is negligible next
to a stage, and every switch's time is in the manifest under ``weight_updates``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from onpolicy_sft.config import LoopConfig, save_config, to_dict

logger = logging.getLogger(__name__)

STAGES = ("rewrite", "ddt", "train", "eval")


class Manifest:
    """``manifest.json``: finished stages and their wall times, rewritten atomically after each."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"stages": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def seconds(self, stage: str) -> float | None:
        entry = self.data["stages"].get(stage)
        return entry["seconds"] if entry else None

    def finish(self, stage: str, seconds: float, **extra) -> None:
        self.data["stages"][stage] = {
            "seconds": round(seconds, 2), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra
        }
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


def load_data(config: LoopConfig):
    """(train corpus, {split: eval set}, general prompts) as the config asks."""
    from onpolicy_sft import arith

    data = config.data
    sizes = {"test": data.n_test, "test_hard": data.n_test_hard}
    if data.source == "arithmetic":
        splits = arith.arithmetic_splits(seed=data.seed, n_train=data.n_train, n_test=data.n_test,
                                         n_test_hard=data.n_test_hard)
        train_set = splits[data.train_split]
        evals = {s: splits[s] for s in data.eval_splits}
    else:
        from onpolicy_sft.data import load_demonstrations

        train_set = load_demonstrations(data.source, split=data.train_split)
        evals = {s: load_demonstrations(data.source, split=s) for s in data.eval_splits}
    train_set = train_set.select(range(min(data.n_train, len(train_set))))
    evals = {s: d.select(range(min(sizes.get(s, data.n_test), len(d)))) for s, d in evals.items()}
    general = arith.general_prompts()[: data.n_general]
    return train_set, evals, general


def make_loop_backend(name: str, model, tokenizer, options: dict):
    """The loop's one backend; vLLM falls back to hf (said once, in the log and the result)."""
    from decoding import BackendUnavailable, make_backend

    if name == "vllm":
        try:
            return make_backend("vllm", model, tokenizer, **options), None
        except BackendUnavailable as err:
            note = f"vLLM is not available here ({err}); using the hf backend for all generation"
            logger.warning(note)
            return make_backend("hf", model, tokenizer), note
    return make_backend(name, model, tokenizer), None


class _Served:
    """Which weights the backend serves, so each stage can switch it only when needed."""

    def __init__(self, backend, key: str):
        self.backend, self.key = backend, key

    def ensure(self, key: str, model, manifest: Manifest, stage: str) -> None:
        if key == self.key:
            return
        start = time.perf_counter()
        self.backend.update_weights(model)
        manifest.data.setdefault("weight_updates", []).append(
            {"for": stage, "seconds": round(time.perf_counter() - start, 3)}
        )
        manifest.save()
        self.key = key


def _scored_corpus(model, tokenizer, corpus):
    """The rewritten corpus with its ddt_ columns (the rewrite scores what it keeps unless told not to)."""
    from onpolicy_sft import ddt

    if "ddt_phi_mean" in corpus.column_names:
        return corpus
    return ddt.score(model, tokenizer, corpus, progress=False)


def _scored_original(model, tokenizer, original, corpus):
    """The original corpus scored under the same model. The rewrite already scored the original of
    every row it kept (ddt_original_*); reuse those when it kept every row, else score afresh."""
    from onpolicy_sft import ddt

    prefix = "ddt_original_"
    reused = [c for c in corpus.column_names if c.startswith(prefix)]
    if reused and len(corpus) == len(original) and "original_response" in corpus.column_names:
        scores = corpus.select_columns(reused + ["prompt", "original_response"])
        scores = scores.rename_columns({c: "ddt_" + c[len(prefix):] for c in reused})
        return scores.rename_column("original_response", "response")
    return ddt.score(model, tokenizer, original, progress=False)


def rewrite_config(values: dict):
    """decoding.rewrite.RewriteConfig from the loop config's ``rewrite`` mapping (nested fields too)."""
    from decoding.rewrite import RewriteConfig

    from onpolicy_sft.config import from_dict

    return from_dict(RewriteConfig, values, where="rewrite")


def _training_columns(corpus):
    keep = [c for c in ("id", "prompt", "response", "answer", "system") if c in corpus.column_names]
    return corpus.select_columns(keep)


def run_loop(config: LoopConfig) -> dict:
    """Run (or resume) the loop; returns the summary: one row per round and the markdown table."""
    import datasets

    from onpolicy_sft import ddt, ddt_report
    from decoding.rewrite import rewrite_corpus
    from onpolicy_sft.evaluate import base_responses, evaluate, forgetting
    from onpolicy_sft.models import load_model, resolve_model_path
    from onpolicy_sft.train import train

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    manifest = Manifest(out / "manifest.json")
    manifest.data["config"] = to_dict(config)
    manifest.save()
    loop_start = time.perf_counter()

    base_path = resolve_model_path(config.model.name)
    base, tokenizer = load_model(base_path, dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code)
    original, eval_sets, general = load_data(config)
    backend, note = make_loop_backend(config.backend, base, tokenizer, config.backend_options)
    manifest.data["backend"] = type(backend).__name__
    # Measured (experiments/benchmarks/vllm_weight_swap.py): updating the running engine in place
    # beats starting a new engine on the checkpoint, so each round's weights go in that way.
    manifest.data["weight_update"] = "in place: Backend.update_weights(model)"
    if note:
        manifest.data["backend_note"] = note
    manifest.save()
    served = _Served(backend, "round_0")

    def stage(name: str, fn):
        if manifest.done(name):
            logger.info("%s: finished earlier, skipping", name)
            return
        logger.info("%s: starting", name)
        start, cpu_start = time.perf_counter(), time.process_time()
        extra = fn() or {}
        # CPU seconds too: on a shared machine the wall time says more about the neighbours
        manifest.finish(name, time.perf_counter() - start, cpu_seconds=round(time.process_time() - cpu_start, 1), **extra)

    general_file = out / "base" / "general_responses.json"

    def make_general():
        served.ensure("round_0", base, manifest, "base/general")
        responses = base_responses(base, tokenizer, general, max_new_tokens=config.eval.forgetting_max_new_tokens,
                                   backend=backend)
        general_file.parent.mkdir(parents=True, exist_ok=True)
        general_file.write_text(json.dumps({"prompts": general, "responses": responses}))

    def eval_stage(r: int, model):
        def run():
            folder = out / f"round_{r}" / "eval"
            served.ensure(f"round_{r}", model, manifest, f"round_{r}/eval")
            metrics = {s: evaluate(model, tokenizer, d, config.eval, backend=backend, out_dir=folder / s)
                       for s, d in eval_sets.items()}
            responses = json.loads(general_file.read_text())["responses"]
            metrics["forgetting"] = forgetting(base, model, tokenizer, general, responses=responses)
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))

        return run

    try:
        stage("base/general", make_general)
        if config.eval_base:
            stage("round_0/eval", eval_stage(0, base))
        current, current_path = base, base_path
        for r in range(1, config.rounds + 1):
            folder = out / f"round_{r}"
            corpus_dir, ddt_dir, ckpt_dir = folder / "corpus", folder / "ddt", folder / "checkpoint"

            def do_rewrite():
                served.ensure(f"round_{r - 1}", current, manifest, f"round_{r}/rewrite")
                corpus = rewrite_corpus(current, tokenizer, original, rewrite_config(config.rewrite),
                                        out_dir=corpus_dir, backend=backend)
                if len(corpus) == 0:
                    raise RuntimeError(f"round {r}: the rewrite kept no rows (fallback 'drop' and nothing verified)")
                corpus.save_to_disk(str(corpus_dir / "dataset"))
                sources = {s: corpus["source"].count(s) for s in ("self", "hinted", "original")}
                return {"rows": len(corpus), "sources": sources}

            def do_ddt():
                corpus = datasets.load_from_disk(str(corpus_dir / "dataset"))
                scored = _scored_corpus(current, tokenizer, corpus)
                scored.save_to_disk(str(ddt_dir / "dataset"))
                corpora = {"rewritten": scored}
                if config.score_original:
                    corpora["original"] = _scored_original(current, tokenizer, original, corpus)
                ddt_report.write_report(ddt_dir, corpora)
                summary = {name: ddt.summarize(d) for name, d in corpora.items()}  # phi_mean: mean of per-row means
                (ddt_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))

            def do_train():
                trainee, _ = load_model(current_path, dtype=config.model.dtype)
                corpus = _training_columns(datasets.load_from_disk(str(ddt_dir / "dataset")))
                train(trainee, tokenizer, corpus, config.train, out_dir=ckpt_dir)
                del trainee

            stage(f"round_{r}/rewrite", do_rewrite)
            stage(f"round_{r}/ddt", do_ddt)
            stage(f"round_{r}/train", do_train)
            tuned, _ = load_model(str(ckpt_dir), dtype=config.model.dtype)
            stage(f"round_{r}/eval", eval_stage(r, tuned))
            current, current_path = tuned, str(ckpt_dir)
    finally:
        backend.close()

    manifest.data["total_seconds_this_run"] = round(time.perf_counter() - loop_start, 1)
    manifest.save()
    return summarize_loop(out, config, manifest)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, value) -> None:
    """Atomic, so a kill never leaves a half-written file that a resumed run would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=float))
    os.replace(tmp, path)


def summarize_loop(out: Path, config: LoopConfig, manifest: Manifest | None = None) -> dict:
    """Per-round rows (mean φ, accuracies, forgetting, stage wall times) + summary.md/.json/.png."""
    manifest = manifest or Manifest(out / "manifest.json")
    rows = []
    for r in range(0, config.rounds + 1):
        metrics = read_json(out / f"round_{r}" / "eval" / "metrics.json")
        ddt_summary = read_json(out / f"round_{r}" / "ddt" / "summary.json") or {}
        if metrics is None and r == 0:
            continue
        row = {"round": r}
        for name in ("rewritten", "original"):
            if name in ddt_summary:
                row[f"phi_{name}"] = ddt_summary[name]["phi_mean"]
        for split in config.data.eval_splits:
            if metrics and split in metrics:
                row[f"acc_{split}"] = metrics[split]["accuracy"]
                row[f"acc_{split}_se"] = metrics[split]["accuracy_se"]
        if metrics and "forgetting" in metrics:
            row["forgetting_kl"] = metrics["forgetting"]["kl"]
            row["forgetting_kl_se"] = metrics["forgetting"]["kl_se"]
        for s in STAGES:
            seconds = manifest.seconds(f"round_{r}/{s}")
            if seconds is not None:
                row[f"seconds_{s}"] = seconds
        rewrite_info = manifest.data["stages"].get(f"round_{r}/rewrite", {})
        if rewrite_info.get("sources"):
            row["sources"] = rewrite_info["sources"]
        rows.append(row)
    table = markdown_table(rows, config.data.eval_splits)
    summary = {"out_dir": str(out), "backend": manifest.data.get("backend"), "backend_note": manifest.data.get("backend_note"),
               "rounds": rows, "table": table, "weight_updates": manifest.data.get("weight_updates", [])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table + "\n")
    plot_summary(rows, config.data.eval_splits, out / "summary.png")
    return summary


def _fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict], splits: list[str]) -> str:
    head = ["round", "φ rewritten", "φ original"] + [f"acc {s}" for s in splits] + ["forgetting KL"]
    head += [f"{s} s" for s in STAGES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["round"]), _fmt(row.get("phi_rewritten")), _fmt(row.get("phi_original"))]
        for s in splits:
            acc = row.get(f"acc_{s}")
            cells.append("–" if acc is None else f"{acc:.3f} ± {row[f'acc_{s}_se']:.3f}")
        kl = row.get("forgetting_kl")
        cells.append("–" if kl is None else f"{kl:.4f} ± {row['forgetting_kl_se']:.4f}")
        cells += [_fmt(row.get(f"seconds_{s}"), 0) for s in STAGES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(rows: list[dict], splits: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row["round"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for s in splits:
        pts = [(row["round"], row[f"acc_{s}"], row[f"acc_{s}_se"]) for row in rows if f"acc_{s}" in row]
        if pts:
            x, y, e = zip(*pts)
            axes[0].errorbar(x, y, yerr=e, marker="o", capsize=3, label=s)
    axes[0].set(title="greedy accuracy", xlabel="round", ylabel="accuracy")
    for name in ("rewritten", "original"):
        pts = [(row["round"], row[f"phi_{name}"]) for row in rows if row.get(f"phi_{name}") is not None]
        if pts:
            x, y = zip(*pts)
            axes[1].plot(x, y, marker="o", label=name)
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].set(title="corpus mean φ (under the round's model)", xlabel="round")
    pts = [(row["round"], row["forgetting_kl"], row["forgetting_kl_se"]) for row in rows if "forgetting_kl" in row]
    if pts:
        x, y, e = zip(*pts)
        axes[2].errorbar(x, y, yerr=e, marker="o", capsize=3)
    axes[2].set(title="forgetting: KL(base ‖ tuned) per token", xlabel="round")
    for ax in axes:
        ax.set_xticks(rounds)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
