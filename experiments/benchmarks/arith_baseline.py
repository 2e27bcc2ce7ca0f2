"""Greedy accuracy of the embedded SmolLM2-135M-Instruct on the embedded arithmetic splits.

The difficulty of ``onpolicy_sft.arith`` was chosen with this: the base model must solve some
``test`` problems (so self-answers exist for the rewrite) and be far from solving all of them.

    .venv/bin/python experiments/benchmarks/arith_baseline.py --n 64 --splits test test_hard
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from onpolicy_sft.arith import arithmetic_splits
from onpolicy_sft.config import EvalConfig
from onpolicy_sft.evaluate import evaluate
from onpolicy_sft.models import EMBEDDED_MODEL, load_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--splits", nargs="+", default=["test"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP spin-waiting on a shared machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(EMBEDDED_MODEL, dtype=torch.float32, device="cpu")
    splits = arithmetic_splits(seed=args.seed, n_train=1, n_test=args.n, n_test_hard=args.n)
    config = EvalConfig(max_new_tokens=args.max_new_tokens)
    results = {}
    for split in args.splits:
        start = time.perf_counter()
        metrics = evaluate(model, tokenizer, splits[split], config, out_dir=RESULTS / "arith_baseline" / split)
        results[split] = {**metrics, "n": args.n, "seconds": round(time.perf_counter() - start, 1)}
        print(split, json.dumps(results[split]), flush=True)
    out = {"model": EMBEDDED_MODEL, "seed": args.seed, "max_new_tokens": args.max_new_tokens, "greedy": True,
           "results": results}
    (RESULTS / "arith_baseline.json").write_text(json.dumps(out, indent=2))
    lines = ["# Embedded model on the arithmetic splits (greedy)", "",
             f"max_new_tokens {args.max_new_tokens}, seed {args.seed}, float32 CPU", "",
             "| split | n | accuracy |", "|---|---|---|"]
    lines += [f"| {s} | {r['n']} | {r.get('accuracy', float('nan')):.3f} |" for s, r in results.items()]
    (RESULTS / "arith_baseline.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
