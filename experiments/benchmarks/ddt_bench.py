"""DDT scoring cost: throughput against a bare forward pass, peak memory against whole logits.

Three ways to process the same length-bucketed batches of the built-in arithmetic corpus
with the same model:
- forward: ``model(input_ids, attention_mask).logits``, nothing else (the bar to meet);
- ddt: ``ddt.sequence_scores`` (decoder body, lm_head on response positions only, in chunks);
- whole_logits: the forward's full [B, T, V] logits, then ``token_stats`` on all of them.

Each way runs in its own subprocess so that peak memory is its own: on CPU the resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs after the model is loaded), on
GPU ``torch.cuda.max_memory_allocated``. Run from the repository root, under the lock:

    flock /tmp/bench.lock .venv/bin/python experiments/benchmarks/ddt_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from onpolicy_sft import ddt
from onpolicy_sft.arith import arithmetic_splits
from onpolicy_sft.encoding import collate, encode_example
from onpolicy_sft.models import load_model
from onpolicy_sft.ops import token_stats

RESULTS = Path(__file__).parent / "results"
WAYS = ("forward", "ddt", "whole_logits")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_batches(tokenizer, n_rows: int, batch_tokens: int) -> list[dict]:
    rows = arithmetic_splits()["train"].select(range(n_rows))
    encoded = [encode_example(tokenizer, p, r) for p, r in zip(rows["prompt"], rows["response"])]
    plan = ddt.plan_batches([len(e["input_ids"]) for e in encoded], batch_tokens)
    return [collate([encoded[i] for i in b], tokenizer.pad_token_id) for b in plan]


def run_way(way: str, model_name: str, n_rows: int, batch_tokens: int, repeats: int) -> dict:
    """One way, in this process: seconds per pass (best of ``repeats``), peak memory above the loaded model."""
    model, tokenizer = load_model(model_name)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(tokenizer, n_rows, batch_tokens)]

    @torch.no_grad()
    def step(b):
        if way == "forward":
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        if way == "ddt":
            return ddt.sequence_scores(model, b["input_ids"], b["labels"], b["attention_mask"])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        return token_stats(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(batches[-1])  # warm-up on the shortest batch
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS") * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            step(b)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return {
        "seconds": min(times),
        "all_seconds": times,
        "peak_extra_mib": (peak - base) / 2**20,
        "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
        "padded_tokens": int(sum(b["input_ids"].numel() for b in batches)),
        "response_tokens": int(sum((b["labels"][:, 1:] != -100).sum() for b in batches)),
        "batches": len(batches),
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # internal: one way per subprocess
    args = parser.parse_args()
    if args.way:
        print(json.dumps(run_way(args.way, args.model, args.rows, args.batch_tokens, args.repeats)))
        return

    results = {}
    for way in WAYS:
        cmd = [sys.executable, __file__, "--way", way, "--model", args.model, "--rows", str(args.rows),
               "--batch-tokens", str(args.batch_tokens), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[way] = json.loads(out.strip().splitlines()[-1])
        results[way]["tokens_per_s"] = results[way]["tokens"] / results[way]["seconds"]
        print(way, json.dumps(results[way]), flush=True)
    fwd, ddt_, whole = results["forward"], results["ddt"], results["whole_logits"]
    report = {
        "command": "flock /tmp/bench.lock .venv/bin/python experiments/benchmarks/ddt_bench.py "
                   f"--model {args.model} --rows {args.rows} --batch-tokens {args.batch_tokens} --repeats {args.repeats}",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "results": results,
        "ddt_overhead_vs_forward": ddt_["seconds"] / fwd["seconds"] - 1,
        "goal_overhead": 0.10,
        "peak_memory_ratio_whole_over_ddt": whole["peak_extra_mib"] / max(ddt_["peak_extra_mib"], 1e-9),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ddt_bench.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# DDT scoring benchmark",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {report['machine']}; model {args.model} ({fwd['dtype']}, {fwd['device']}, {fwd['threads']} threads); "
        f"{fwd['batches']} length-bucketed batches of the arithmetic train split, {fwd['tokens']} real tokens "
        f"({fwd['padded_tokens']} padded, {fwd['response_tokens']} response tokens); best of {args.repeats} passes.",
        "",
        "| way | seconds | tokens/s | peak memory above the model (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for way in WAYS:
        r = results[way]
        lines.append(f"| {way} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_extra_mib']:.0f} |")
    lines += [
        "",
        f"DDT overhead against the bare forward pass: {report['ddt_overhead_vs_forward']:+.1%} (goal ≤ +10%).",
        f"Peak memory, whole logits over DDT's chunked path: {report['peak_memory_ratio_whole_over_ddt']:.1f}×.",
        "",
        "forward = `model(...).logits` only; ddt = `ddt.sequence_scores` (lm_head on response positions, "
        "in chunks); whole_logits = full logits then `token_stats` on all of them.",
        "",
    ]
    (RESULTS / "ddt_bench.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
