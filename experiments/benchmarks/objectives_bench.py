"""Peak memory and time of the objectives: fused (chunked) vs materialised logits, and vs PyTorch.

    flock /tmp/bench.lock .venv/bin/python experiments/benchmarks/objectives_bench.py [--sizes 2048 8192 32768]

Shape of the embedded model (H = 576, V = 49152), float32 on CPU, one forward + backward of the
loss wrt hidden states and lm_head weight. Paths:
- fused:        Objective.fused(hidden, W, labels): logits exist one chunk at a time.
- from_logits:  logits = hidden @ W.T held whole (as TRL's DFT and LLaMA-Factory's DFT/ASFT
                do), then Objective.from_logits; teacher logits are materialised too.
- torch_lce:    torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (chunked), sft only.
- torch_ce:     F.cross_entropy(hidden @ W.T, labels), plain autograd, sft only.

Each (size, method, path) runs in a fresh subprocess. Peak memory = the process's peak RSS
(getrusage ru_maxrss, tracked by the kernel) during the first forward+backward minus the RSS
just before it, i.e. everything the step allocated beyond its inputs. Time = the best of
``--reps`` runs (the machine is shared, so the minimum is the least noisy figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from onpolicy_sft.objectives import build
from onpolicy_sft.objectives.engine import DEFAULT_CHUNK_TOKENS

H, V = 576, 49152
METHODS = ["sft", "dft", "idft", "target_sft", "dpo"]
RESULTS = Path(__file__).parent / "results"


def _inputs(n: int, method: str):
    g = torch.Generator().manual_seed(0)
    rows = 8 if method == "dpo" else 1  # dpo: 4 pairs of n/8 tokens each
    hidden = torch.randn(rows, n // rows, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.05
    labels = torch.randint(0, V, (rows, n // rows), generator=g)
    ctx = {}
    if method == "target_sft":
        ctx = {"teacher_hidden": torch.randn(rows, n // rows, H, generator=g), "teacher_lm_head_weight": weight * 1.5}
    if method == "dpo":
        ctx = {"ref_logps": -torch.rand(rows, generator=g) * n}
    return hidden, weight, labels, ctx


def _step(path: str, method: str, hidden, weight, labels, ctx, chunk: int):
    h, w = hidden, weight
    h.grad = w.grad = None
    if path == "fused":
        loss, _ = build(method, chunk_tokens=chunk).fused(h, w, labels, **ctx)
    elif path == "from_logits":
        lctx = dict(ctx)
        if "teacher_hidden" in lctx:
            lctx = {"teacher_logits": lctx["teacher_hidden"] @ lctx["teacher_lm_head_weight"].T}
        loss, _ = build(method, chunk_tokens=chunk).from_logits(h @ w.T, labels, **lctx)
    elif path == "torch_lce":
        loss = F.linear_cross_entropy(h.flatten(0, 1), w, labels.flatten(), options=torch.nn.LinearCrossEntropyOptions())
    elif path == "torch_ce":
        loss = F.cross_entropy((h @ w.T).flatten(0, 1), labels.flatten())
    else:
        raise ValueError(path)
    loss.backward()
    return float(loss.detach())


def run_one(n: int, method: str, path: str, reps: int, chunk: int) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    hidden, weight, labels, ctx = _inputs(n, method)
    inputs = (hidden.requires_grad_(), weight.requires_grad_(), labels, ctx)
    proc = psutil.Process()
    before = proc.memory_info().rss
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        loss = _step(path, method, *inputs, chunk)
        times.append(time.perf_counter() - start)
        if not times[1:]:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"n": n, "method": method, "path": path, "peak_mb": (peak - before) / 2**20, "time_s": min(times),
            "times_s": times, "loss": loss, "chunk_tokens": chunk}


def predicted_mb(n: int, path: str, method: str) -> float:
    """A guess of a path's peak, to skip what would not fit: the [N, V] float32 buffers each path
    keeps alive (from_logits: logits and their gradient, plus the teacher's logits; torch_ce: logits,
    softmax and gradient), plus a fixed allowance for the process."""
    nv = n * V * 4 / 2**20
    per_path = {"fused": 0.0, "torch_lce": 0.5, "from_logits": 2.0, "torch_ce": 3.0}[path]
    if method == "target_sft" and path == "from_logits":
        per_path += 1
    return per_path * nv + 1500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--paths", nargs="+", default=["fused", "from_logits", "torch_lce", "torch_ce"])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: the engine's)")
    parser.add_argument("--one", nargs=3, metavar=("N", "METHOD", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "objectives"))
    args = parser.parse_args()
    if args.chunk is None:
        args.chunk = DEFAULT_CHUNK_TOKENS
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1], args.one[2], args.reps, args.chunk)))
        return

    rows = []
    for n in args.sizes:
        for method in args.methods:
            for path in args.paths:
                if path.startswith("torch") and method != "sft":
                    continue
                free = psutil.virtual_memory().available / 2**20
                need = predicted_mb(n, path, method)
                if need > 0.8 * free:
                    row = {"n": n, "method": method, "path": path, "skipped": f"needs ~{need:.0f} MB, {free:.0f} MB free"}
                else:
                    cmd = [sys.executable, __file__, "--one", str(n), method, path, "--reps", str(args.reps),
                           "--chunk", str(args.chunk)]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        row = {"n": n, "method": method, "path": path, "skipped": f"failed: {out.stderr.strip()[-300:]}"}
                    else:
                        row = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    write(rows, Path(args.out), args)


def write(rows: list[dict], out: Path, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"H": H, "V": V, "dtype": "float32", "device": "cpu", "threads": int(os.environ.get("BENCH_THREADS", "2")),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "reps": args.reps,
            "chunk_tokens": args.chunk, "command": " ".join(["python"] + sys.argv)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    by = {(r["n"], r["method"], r["path"]): r for r in rows}
    lines = [
        "# Objectives: fused (chunked) vs materialised logits", "",
        f"H = {H}, V = {V}, float32, CPU ({meta['threads']} threads), torch {meta['torch']}, "
        f"chunk = {args.chunk} tokens. Peak = peak RSS during the first forward+backward minus RSS before it "
        f"(getrusage, fresh process per cell). Time = best of {args.reps} forward+backward runs.",
        "", f"Command: `{meta['command']}`", "",
        "| N | method | fused MB | from_logits MB | mem ratio | fused s | from_logits s | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, key, fmt):
        if r is None:
            return "—"
        return r.get("skipped", "skipped") if key not in r else format(r[key], fmt)

    for n in args.sizes:
        for method in args.methods:
            f, m = by.get((n, method, "fused")), by.get((n, method, "from_logits"))
            ok = f and m and "peak_mb" in f and "peak_mb" in m
            mem = f"{f['peak_mb'] / m['peak_mb']:.1%}" if ok else "—"
            tim = f"{f['time_s'] / m['time_s']:.2f}×" if ok else "—"
            lines.append(f"| {n} | {method} | {cell(f, 'peak_mb', '.0f')} | {cell(m, 'peak_mb', '.0f')} | {mem} | "
                         f"{cell(f, 'time_s', '.2f')} | {cell(m, 'time_s', '.2f')} | {tim} |")
    lines += ["", "## sft vs PyTorch", "",
              "| N | fused MB | torch_lce MB | torch_ce MB | fused s | torch_lce s | torch_ce s |", "|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        f, lce, ce = (by.get((n, "sft", p)) for p in ("fused", "torch_lce", "torch_ce"))
        lines.append(f"| {n} | {cell(f, 'peak_mb', '.0f')} | {cell(lce, 'peak_mb', '.0f')} | {cell(ce, 'peak_mb', '.0f')} | "
                     f"{cell(f, 'time_s', '.2f')} | {cell(lce, 'time_s', '.2f')} | {cell(ce, 'time_s', '.2f')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
