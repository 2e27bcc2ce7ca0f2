"""Training tokens/s with padded against padding-free (packed) micro-batches, on the embedded model.

The rows are the built-in arithmetic training set (its real length spread, chat template
included), cut into optimizer steps and micro-batches by ``train_data.plan_steps`` exactly as the
trainer does, with and without length grouping. Each micro-batch runs the fused SFT loss forward
and backward (``objectives.adapters.causal_lm_loss``), padded or with ``packed=True``; the
optimizer update is the same for both and left out. Tokens/s counts real tokens only, so the
two modes are compared on the same work. Modes alternate per micro-batch so that machine noise
hits both alike; the first pass of each mode is a warm-up and not timed.

    flock /tmp/heavy.lock .venv/bin/python experiments/benchmarks/packing_bench.py [--rows 64]

Writes experiments/benchmarks/results/packing_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from onpolicy_sft.arith import arithmetic_splits
from onpolicy_sft.encoding import collate, encode_row
from onpolicy_sft.models import load_model
from onpolicy_sft.objectives import build
from onpolicy_sft.objectives.adapters import causal_lm_loss
from onpolicy_sft.train_data import plan_steps

RESULTS = Path(__file__).parent / "results"


def padding_fraction(lengths: list[int], micro_batches: list[list[int]]) -> float:
    padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in micro_batches)
    return 1.0 - sum(lengths[i] for mb in micro_batches for i in mb) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "packing_bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    model.train()
    device = next(model.parameters()).device
    rows = [encode_row(tokenizer, r) for r in arithmetic_splits()["train"].select(range(args.rows))]
    lengths = [len(r["input_ids"]) for r in rows]
    objective = build("sft")

    def run(batch, packed: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = causal_lm_loss(model, objective, batch, packed=packed)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    results = []
    for grouped in (True, False):
        plan = plan_steps(lengths, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                          group_by_length=grouped, seed=0)
        micro = [mb for step in plan for proc in step for mb in proc if mb]
        batches = [{k: v.to(device) for k, v in collate([rows[i] for i in mb], tokenizer.pad_token_id).items()}
                   for mb in micro]
        for packed in (False, True):
            run(batches[0], packed)  # warm-up
        seconds = {False: 0.0, True: 0.0}
        for i, batch in enumerate(batches):
            for packed in ((False, True) if i % 2 == 0 else (True, False)):
                seconds[packed] += run(batch, packed)
        real = sum(lengths[i] for mb in micro for i in mb)
        for packed in (False, True):
            results.append({
                "length_grouping": grouped, "mode": "packed" if packed else "padded",
                "micro_batches": len(micro), "real_tokens": real,
                "padding_fraction": 0.0 if packed else round(padding_fraction(lengths, micro), 4),
                "seconds": round(seconds[packed], 2), "tokens_per_s": round(real / seconds[packed], 1),
            })
            print(results[-1], flush=True)

    command = ("flock /tmp/heavy.lock .venv/bin/python experiments/benchmarks/packing_bench.py "
               f"--rows {args.rows} --batch-size {args.batch_size} --micro-batch-size {args.micro_batch_size} "
               f"--threads {args.threads}")
    meta = {"command": command, "model": args.model, "device": str(device), "dtype": str(next(model.parameters()).dtype),
            "threads": args.threads, "row_lengths": {"min": min(lengths), "max": max(lengths),
                                                     "mean": round(sum(lengths) / len(lengths), 1)},
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        "# Training tokens/s: padded vs padding-free packed micro-batches",
        "",
        f"`{command}`",
        "",
        f"{args.model}, {meta['dtype']}, {meta['device']}, {args.threads} threads; {args.rows} rows of the built-in "
        f"arithmetic train split (lengths {min(lengths)}–{max(lengths)} tokens, mean {meta['row_lengths']['mean']}), "
        f"steps of {args.batch_size} rows in micro-batches of {args.micro_batch_size} (train.plan_steps); fused SFT "
        "forward + backward per micro-batch, no optimizer update; tokens/s over real tokens.",
        "",
        "| length grouping | mode | micro-batches | padding share | seconds | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {'on' if r['length_grouping'] else 'off'} | {r['mode']} | {r['micro_batches']} | "
                     f"{r['padding_fraction']:.1%} | {r['seconds']} | {r['tokens_per_s']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
