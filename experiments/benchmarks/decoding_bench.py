"""Hinted Decoding throughput: two streams against one, against the reference loop, vLLM against hf.

On the same arithmetic questions (hinted prompt: instruction + question + reference solution;
student prompt: the question alone), with the embedded model:
- two_stream: hf Hinted Decoding of B pairs, exactly L new tokens (end-of-sequence and the
  repetition stop switched off so every run decodes the same length);
- single_student / single_hinted: plain hf sampling of the same B prompts, exactly L tokens
  (the goal is two_stream <= 2.2x single_student: two streams cost twice the compute, no more);
- reference: the plain uncached loop (batch 1 only: it runs one pair at a time anyway);
- vllm vs hf: greedy Hinted Decoding and greedy sampling on the same prompts with normal
  stopping (both give the same ids, so the same token counts); engine start-up reported apart.

    flock /tmp/bench.lock .venv/bin/python experiments/benchmarks/decoding_bench.py [--sizes 1 8 32]
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

from decoding import HintedDecodingConfig, SamplingConfig, make_backend
from decoding.hf import hf_sample, hf_two_stream
from decoding.reference import reference_two_stream
from onpolicy_sft.arith import arithmetic_splits
from onpolicy_sft.hint_template import HintTemplate, hinted_prompt_ids, student_prompt_ids
from onpolicy_sft.models import load_model, resolve_model_path

RESULTS = Path(__file__).parent / "results"


def prompts(tokenizer, n: int):
    rows = arithmetic_splits(n_train=max(n, 8))["train"].select(range(n))
    hinted = [hinted_prompt_ids(tokenizer, HintTemplate(), r["prompt"], r["response"]) for r in rows]
    student = [student_prompt_ids(tokenizer, r["prompt"]) for r in rows]
    return hinted, student


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_hf(model_name: str, sizes: list[int], length: int) -> list[dict]:
    model, tok = load_model(model_name, dtype=torch.float32)
    # No end-of-sequence: every run decodes exactly `length` tokens per row.
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    hinted, student = prompts(tok, max(sizes))
    rows = []
    for b in sizes:
        hd = HintedDecodingConfig(temperature=0.3, max_new_tokens=length, batch_size=b, repeat_count=10**9)
        sc = SamplingConfig(temperature=0.3, max_new_tokens=length)
        t_two, out = timed(lambda: hf_two_stream(model, hinted[:b], student[:b], hd, None))
        assert all(len(o) == length for o in out)
        t_student, _ = timed(lambda: hf_sample(model, student[:b], sc, None, batch_rows=b))
        t_hinted, _ = timed(lambda: hf_sample(model, hinted[:b], sc, None, batch_rows=b))
        row = {
            "batch": b, "new_tokens": length,
            "hinted_prompt_tokens": sum(map(len, hinted[:b])), "student_prompt_tokens": sum(map(len, student[:b])),
            "two_stream_s": t_two, "single_student_s": t_student, "single_hinted_s": t_hinted,
            "ratio_vs_single_student": t_two / t_student,
            "ratio_vs_both_singles": t_two / (t_student + t_hinted),
            "two_stream_tokens_per_s": b * length / t_two,
        }
        if b == 1:
            t_ref, ref = timed(lambda: reference_two_stream(model, hinted[:1], student[:1], hd, None))
            row.update(reference_s=t_ref, two_stream_vs_reference=t_two / t_ref, same_ids_as_reference=ref == out)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_vllm(model_name: str, batch: int, length: int) -> dict:
    model, tok = load_model(model_name, dtype=torch.float32)
    hinted, student = prompts(tok, batch)
    hd = HintedDecodingConfig(temperature=0.0, max_new_tokens=length, batch_size=batch)
    sc = SamplingConfig(temperature=0.0, max_new_tokens=length)
    t_start, backend = timed(lambda: make_backend("vllm", resolve_model_path(model_name), tok, max_model_len=1024))
    t_v2, v2 = timed(lambda: backend.two_stream(hinted, student, hd, tok))
    t_v1, v1 = timed(lambda: backend.sample(student, sc))
    backend.close()
    t_h2, h2 = timed(lambda: hf_two_stream(model, hinted, student, hd, tok))
    t_h1, h1 = timed(lambda: hf_sample(model, student, sc, tok, batch_rows=batch))
    n2, n1 = sum(map(len, v2)), sum(len(c[0]) for c in v1)
    return {
        "batch": batch, "max_new_tokens": length, "engine_start_s": t_start,
        "two_stream": {"vllm_s": t_v2, "hf_s": t_h2, "tokens": n2, "same_ids": v2 == h2,
                       "vllm_tokens_per_s": n2 / t_v2, "hf_tokens_per_s": n2 / t_h2},
        "sample": {"vllm_s": t_v1, "hf_s": t_h1, "tokens": n1, "same_ids": v1 == h1,
                   "vllm_tokens_per_s": n1 / t_v1, "hf_tokens_per_s": n1 / t_h1},
    }


def write_md(result: dict, path: Path) -> None:
    lines = [
        "# Hinted Decoding throughput", "",
        f"{result['model']}, float32, {result['device']}, torch threads {result['threads']}, "
        f"{result['new_tokens']} new tokens per row. Command: `{result['command']}`", "",
        "| batch | two-stream s | single (student) s | single (hinted) s | two / single student | two / (both singles) | reference s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["hf"]:
        ref = f"{r['reference_s']:.1f}" if "reference_s" in r else "-"
        lines.append(f"| {r['batch']} | {r['two_stream_s']:.1f} | {r['single_student_s']:.1f} | {r['single_hinted_s']:.1f} "
                     f"| {r['ratio_vs_single_student']:.2f} | {r['ratio_vs_both_singles']:.2f} | {ref} |")
    v = result.get("vllm")
    if isinstance(v, dict) and "engine_start_s" in v:
        lines += ["", f"## vLLM vs hf (greedy, batch {v['batch']}, up to {v['max_new_tokens']} tokens; "
                      f"engine start-up {v['engine_start_s']:.1f} s, not included)", "",
                  "| work | tokens | vLLM s | hf s | vLLM tok/s | hf tok/s | same ids |", "|---|---|---|---|---|---|---|"]
        for key in ("two_stream", "sample"):
            w = v[key]
            lines.append(f"| {key} | {w['tokens']} | {w['vllm_s']:.1f} | {w['hf_s']:.1f} | {w['vllm_tokens_per_s']:.1f} "
                         f"| {w['hf_tokens_per_s']:.1f} | {w['same_ids']} |")
    elif v:
        lines += ["", f"vLLM: {v}"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--vllm-batch", type=int, default=8)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (a smoke test writes elsewhere)")
    parser.add_argument("--vllm-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_only:  # child process: one vLLM engine per process
        print("VLLM " + json.dumps(bench_vllm(args.model, args.vllm_batch, args.new_tokens)))
        return
    result = {
        "model": args.model, "device": "cuda" if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
        "command": "python " + " ".join(sys.argv),
        "hf": bench_hf(args.model, args.sizes, args.new_tokens),
    }
    if not args.skip_vllm:
        proc = subprocess.run([sys.executable, __file__, "--vllm-only", "--model", args.model,
                               "--vllm-batch", str(args.vllm_batch), "--new-tokens", str(args.new_tokens)],
                              capture_output=True, text=True, env=dict(os.environ))
        found = [line[5:] for line in proc.stdout.splitlines() if line.startswith("VLLM ")]
        result["vllm"] = json.loads(found[-1]) if found else f"failed: {proc.stderr[-1500:]}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decoding_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    write_md(result, args.out / "decoding_bench.md")
    print((args.out / "decoding_bench.md").read_text())


if __name__ == "__main__":
    main()
