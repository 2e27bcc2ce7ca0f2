"""How often the embedded model answers arithmetic problems right, per number of operations.

Samples the loop's self-answers (k per problem, temperature 1, the loop's token limit) and one
greedy answer for problems of each operation count at the ``easy`` level's numbers, and sorts
every answer into right / wrong / no answer / cut at the limit (onpolicy_sft.rewrite.outcome). The
``train`` split's level mix was chosen from this table (results/arith_calibration.md).

    flock /tmp/heavy.lock .venv/bin/python experiments/benchmarks/arith_calibration.py --n 48 --k 2
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch

from decoding import SamplingConfig, make_backend
from decoding.rules import eos_ids
from onpolicy_sft.arith import LEVELS, _problem, to_row
from onpolicy_sft.encoding import encode_prompt
from onpolicy_sft.models import EMBEDDED_MODEL, load_tokenizer, resolve_model_path
from onpolicy_sft.rewrite import outcome

RESULTS = Path(__file__).parent / "results"


def problems(n_ops: int, n: int, level: str, seed: int) -> list[dict]:
    rng = random.Random(f"calibration/{seed}/{level}/{n_ops}")
    out, seen = [], set()
    while len(out) < n:
        p = _problem(rng, rng.randrange(24), n_ops, LEVELS[level])
        if p is not None and p.question not in seen:
            seen.add(p.question)
            out.append(to_row(p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--levels", nargs="+", default=["easy"])
    ap.add_argument("--ops", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--no-greedy", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    backend = make_backend("vllm", resolve_model_path(EMBEDDED_MODEL), tokenizer, max_model_len=1024)
    stops = eos_ids(None, tokenizer)
    table, samples = [], []
    for level in args.levels:
        for n_ops in args.ops:
            rows = problems(n_ops, args.n, level, args.seed)
            prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
            modes = [("sampled", SamplingConfig(n=args.k, temperature=args.temperature, max_new_tokens=args.max_new_tokens))]
            if not args.no_greedy:
                modes.append(("greedy", SamplingConfig(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)))
            for mode, sampling in modes:
                start = time.perf_counter()
                outs = backend.sample(prompts, sampling, seeds=list(range(len(prompts))))
                counts = Counter()
                solved = 0
                for r, per_row in zip(rows, outs):
                    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in per_row]
                    kinds = [outcome(t, r["answer"], bool(ids) and ids[-1] not in stops) for t, ids in zip(texts, per_row)]
                    counts.update(kinds)
                    solved += "right" in kinds
                    samples.append({"level": level, "n_ops": n_ops, "mode": mode, "prompt": r["prompt"],
                                    "answer": r["answer"], "texts": texts, "outcomes": kinds})
                entry = {"level": level, "n_ops": n_ops, "mode": mode, "problems": len(rows),
                         "answers": sum(counts.values()), **{k: counts.get(k, 0) for k in ("right", "wrong", "no_answer", "cut")},
                         "solved_any": solved, "seconds": round(time.perf_counter() - start, 1)}
                print(json.dumps(entry), flush=True)
                table.append(entry)
    backend.close()
    out = {"model": EMBEDDED_MODEL, "args": vars(args), "results": table}
    (RESULTS / f"arith_calibration{args.tag}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"arith_calibration{args.tag}_samples.json").write_text(json.dumps(samples, indent=1) + "\n")


if __name__ == "__main__":
    main()
