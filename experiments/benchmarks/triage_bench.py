"""DDT triage against the full rewrite, on a corpus half the model's own and half demonstrations.

The corpus: n arithmetic training questions; every other row's response is the embedded model's
own greedy answer, the rest keep the original demonstration. The full rewrite (every row) and the
triaged rewrite (``rewrite.triage.by``) run with the same settings; the goal (issue 21) is that the
triage keeps the model's own rows, rewrites the others, and takes at most 0.55x the full rewrite's
time for a corpus mean φ within 0.05 of the full rewrite's. The runs alternate (full, triage, full,
...) so that a slow spell on the shared machine hits both. Results: results/triage_bench_<by>.json and .md.

    PYTHONPATH=. .venv/bin/python experiments/benchmarks/triage_bench.py --n 16 --repeats 2 --by phi --max-new-tokens 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset

from decoding import HintedDecodingConfig, SamplingConfig, make_backend
from onpolicy_sft.arith import arithmetic_splits
from onpolicy_sft.hint_template import student_prompt_ids
from onpolicy_sft.models import EMBEDDED_MODEL, load_model
from onpolicy_sft.rewrite import rewrite_corpus
from onpolicy_sft.rewrite_config import RewriteConfig, TriageConfig

RESULTS = Path(__file__).parent / "results"


def mixed_corpus(backend, tokenizer, n: int, max_new_tokens: int) -> Dataset:
    """n training questions, the even rows answered by the model itself (greedy), the odd rows the
    original demonstrations."""
    rows = arithmetic_splits(seed=0, n_train=n, n_test=1, n_test_hard=1)["train"].to_list()
    own = rows[::2]
    prompts = [student_prompt_ids(tokenizer, r["prompt"], r.get("system") or "") for r in own]
    greedy = backend.sample(prompts, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
    for row, out in zip(own, greedy):
        row["response"] = tokenizer.decode(out[0], skip_special_tokens=True).strip()
    return Dataset.from_list([{**r, "id": str(i), "own": i % 2 == 0} for i, r in enumerate(rows)])


def timed(model, tokenizer, backend, corpus, config) -> dict:
    start = time.perf_counter()
    rows, stats = rewrite_corpus(model, tokenizer, corpus, config, backend=backend)
    return {"seconds": time.perf_counter() - start, "stats": stats, "sources": rows["source"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--by", choices=["p_value", "phi"], default="phi")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(EMBEDDED_MODEL, dtype=torch.float32, device="cpu")
    backend = make_backend("hf", model, tokenizer)
    corpus = mixed_corpus(backend, tokenizer, args.n, args.max_new_tokens)
    # The main job's rewrite settings (README): k = 2 self-answers at T = 1, one hinted attempt at T = 0.3.
    full = RewriteConfig(k_self=2, m_hinted=1, progress=False, shard_size=8,
                         sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens),
                         hinted=HintedDecodingConfig(temperature=0.3, max_new_tokens=args.max_new_tokens))
    triage = RewriteConfig(**{**full.__dict__, "triage": TriageConfig(by=args.by)})
    runs = {"full": [], "triage": []}
    for _ in range(args.repeats):
        for name, config in (("full", full), ("triage", triage)):
            runs[name].append(timed(model, tokenizer, backend, corpus, config))
            print(name, round(runs[name][-1]["seconds"], 1), "s", flush=True)
    report(args, corpus, runs)


def report(args, corpus, runs) -> None:
    own = corpus["own"]
    last = {name: r[-1] for name, r in runs.items()}
    seconds = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
    phi = {name: r["stats"]["phi_after"] for name, r in last.items()}
    kept_own = [s == "in_distribution" for s in last["triage"]["sources"]]
    result = {
        "model": EMBEDDED_MODEL, "n": args.n, "by": args.by, "max_new_tokens": args.max_new_tokens,
        "threads": args.threads, "repeats": args.repeats,
        "seconds": {name: [round(r["seconds"], 1) for r in rs] for name, rs in runs.items()},
        "time_ratio": seconds["triage"] / seconds["full"],
        "phi_corpus": phi, "phi_gap": abs(phi["triage"] - phi["full"]),
        "own_rows_kept": sum(k and o for k, o in zip(kept_own, own)), "own_rows": sum(own),
        "other_rows_rewritten": sum(not k and not o for k, o in zip(kept_own, own)), "other_rows": len(own) - sum(own),
        "per_source": {name: r["stats"]["per_source"] for name, r in last.items()},
    }
    result["met"] = (result["time_ratio"] <= 0.55 and result["phi_gap"] <= 0.05
                     and result["own_rows_kept"] == result["own_rows"]
                     and result["other_rows_rewritten"] == result["other_rows"])
    (RESULTS / f"triage_bench_{args.by}.json").write_text(json.dumps(result, indent=2))
    per_source = {k: "/".join(str(v[s]) for s in ("self", "hinted", "original", "in_distribution"))
                  for k, v in result["per_source"].items()}
    lines = [
        "# DDT triage against the full rewrite", "",
        f"Embedded model, hf backend, float32 CPU ({args.threads} threads, shared machine), {args.n} arithmetic "
        f"training questions: the even rows the model's own greedy answers, the odd rows the demonstrations. "
        f"k_self 2 (T 1), m_hinted 1 (T 0.3), {args.max_new_tokens} new tokens; triage by {args.by} at its "
        f"default level. Time: the best of {args.repeats} alternating runs.", "",
        "    PYTHONPATH=. .venv/bin/python experiments/benchmarks/triage_bench.py "
        f"--n {args.n} --repeats {args.repeats} --by {args.by} --max-new-tokens {args.max_new_tokens} "
        f"--threads {args.threads}", "",
        "| rewrite | seconds | corpus self/hinted/original/in_distribution | corpus φ |", "|---|---|---|---|",
        *[f"| {name} | {seconds[name]:.1f} | {per_source[name]} | {phi[name]:.3f} |" for name in ("full", "triage")],
        "", "| goal | measured | met |", "|---|---|---|",
        f"| time ≤ 0.55 × full | {result['time_ratio']:.2f} × | {'yes' if result['time_ratio'] <= 0.55 else 'no'} |",
        f"| corpus φ within 0.05 of full | {result['phi_gap']:.3f} | {'yes' if result['phi_gap'] <= 0.05 else 'no'} |",
        f"| model's own rows kept | {result['own_rows_kept']} of {result['own_rows']} | "
        f"{'yes' if result['own_rows_kept'] == result['own_rows'] else 'no'} |",
        f"| demonstrations rewritten | {result['other_rows_rewritten']} of {result['other_rows']} | "
        f"{'yes' if result['other_rows_rewritten'] == result['other_rows'] else 'no'} |",
    ]
    (RESULTS / f"triage_bench_{args.by}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
