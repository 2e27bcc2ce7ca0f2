"""Host cost per decode step of the Hinted-Decoding pair mixer at GPU batch sizes (issue 22).

`PairBook.apply` as an engine drives it: P pairs (2P rows of one batch, the two rows of a pair far
apart), every row advancing one token per step, output lists holding placeholders (as asynchronous
scheduling leaves them), the answer guard on ("auto" markers) and the default sampling knobs.
Timed: `apply` alone, median over steps after warm-up, torch on one thread; and, apart, the time
inside decoding.mixing.hinted_step (the mixing, top-p cut and draw), so that `apply` minus that is
the book's own host cost.

- `bookkeeping`: V = 64 logits decoded with the tiny character tokenizer, so the tensor math is
  negligible and what is left is the per-pair bookkeeping.
- `embedded`: the embedded model's vocabulary and tokenizer (SmolLM2, V = 49152), logits shaped
  like a language model's (a few likely tokens over a long tail): the tensor math included.

    PYTHONPATH=. .venv/bin/python experiments/benchmarks/pair_mixer_bench.py --label after [--pairs 8 64 256 1024]
        [--skip-embedded | --skip-bookkeeping] [--commit SHA]

Each run writes results/pair_mixer_bench_<label>.json; the table results/pair_mixer_bench.md
shows every label found there, side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import decoding.pairs  # noqa: E402
from decoding import HintedDecodingConfig  # noqa: E402
from decoding.pairs import PairBook, pair_spec  # noqa: E402
from decoding.rules import answer_markers  # noqa: E402
from tiny import make_tiny_tokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class MathClock:
    """Seconds spent inside the book's calls of hinted_step."""

    def __init__(self):
        self.spent, inner = 0.0, decoding.pairs.hinted_step

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.spent += time.perf_counter() - start
            return out

        decoding.pairs.hinted_step = timed


def run(tok, pairs: int, vocab: int, warmup: int, steps: int, clock: MathClock, seed: int = 0) -> list[tuple]:
    """(seconds of `apply`, seconds of it inside hinted_step) of each timed step."""
    cfg = HintedDecodingConfig()
    markers = answer_markers(cfg.answer_marker)
    book, outs = PairBook(lambda: tok), [[] for _ in range(2 * pairs)]
    # Row r of pair i sits at i (hinted) and P + i (student): the pair's rows are far apart, as in a real batch.
    added = [(role * pairs + i, pair_spec(f"p{i}", name, seed=i, config=cfg, markers=markers, eos=tok.eos_token_id),
              outs[role * pairs + i]) for i in range(pairs) for role, name in enumerate(("hinted", "student"))]
    book.update([], added, [])
    g = torch.Generator().manual_seed(seed)
    bank = []
    for _ in range(2 if vocab > 1024 else 8):
        logits = torch.randn(2 * pairs, vocab, generator=g) * 2
        if vocab > 1024:  # a language model's shape: a few likely tokens, the rest a long tail
            logits[:, torch.randint(vocab, (24,), generator=g)] += 12
        bank.append(logits)
    times = []
    for k in range(warmup + steps):
        logits = bank[k % len(bank)].clone()
        clock.spent = 0.0
        start = time.perf_counter()
        book.apply(logits)
        spent = time.perf_counter() - start
        if k >= warmup:
            times.append((spent, clock.spent))
        for out in outs:
            out.append(-1)
    return times


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"


def write_md(folder: Path) -> None:
    results = {p.stem.removeprefix("pair_mixer_bench_"): json.loads(p.read_text())
               for p in sorted(folder.glob("pair_mixer_bench_*.json"))}
    labels = sorted(results, key=lambda s: (s != "before", s))
    lines = ["# Pair mixer: host cost per decode step (`PairBook.apply`)", ""]
    for label in labels:
        r = results[label]
        commands = "; ".join(f"{part}: `{cmd}`" for part, cmd in r["commands"].items())
        lines.append(f"- **{label}** (commit {r['commit']}, {r['device']}, torch threads 1): {commands}")
    lines += ["", "Median of the timed steps; µs per pair = median / pairs; book = `apply` minus the time inside "
              "hinted_step (the tensor math), step by step. The machine is shared (2 cores, other jobs): expect noise.", ""]
    for part in ("bookkeeping", "embedded"):
        rows = {label: {row["pairs"]: row for row in results[label].get(part, [])} for label in labels}
        sizes = sorted({p for per in rows.values() for p in per})
        if not sizes:
            continue
        vocab = next(row["vocab"] for per in rows.values() for row in per.values())
        lines += [f"## {part} (V = {vocab})", "",
                  "| pairs | " + " | ".join(f"{label} ms/step | {label} µs/pair | {label} book µs/pair"
                                           for label in labels) + " |",
                  "|---" * (1 + 3 * len(labels)) + "|"]
        for p in sizes:
            cells = []
            for label in labels:
                row = rows[label].get(p)
                cells += ([f"{row['median_ms']:.2f}", f"{row['us_per_pair']:.1f}", f"{row['book_us_per_pair']:.1f}"]
                          if row else ["-"] * 3)
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines.append("")
    (folder / "pair_mixer_bench.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True, help="before / after: the name this run is stored under")
    parser.add_argument("--pairs", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--embedded-pairs", type=int, nargs="+", default=None, help="default: --pairs")
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--skip-bookkeeping", action="store_true")
    parser.add_argument("--commit", default=None, help="the commit measured, where the code is not a git checkout")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.out / f"pair_mixer_bench_{args.label}.json"
    # A part run alone (--skip-bookkeeping / --skip-embedded) keeps the other part of an earlier run.
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(label=args.label, commit=args.commit or commit(), device=platform.processor() or "cpu")
    result.setdefault("commands", {})
    parts = [] if args.skip_bookkeeping else [("bookkeeping", make_tiny_tokenizer, 64, args.pairs, 5, 35)]
    if not args.skip_embedded:
        from onpolicy_sft.models import load_tokenizer

        parts.append(("embedded", lambda: load_tokenizer("smollm2-135m-instruct"), 49152,
                      args.embedded_pairs or args.pairs, 3, 9))
    clock = MathClock()
    for part, load, vocab, sizes, warmup, steps in parts:
        tok = load()
        result[part] = []
        result["commands"][part] = "python " + " ".join(sys.argv)
        for pairs in sizes:
            times = run(tok, pairs, vocab, warmup, steps, clock)
            median = statistics.median(t for t, _ in times)
            book = statistics.median(t - m for t, m in times)
            row = {"pairs": pairs, "vocab": vocab, "steps": steps, "warmup": warmup, "median_ms": 1e3 * median,
                   "min_ms": 1e3 * min(t for t, _ in times), "max_ms": 1e3 * max(t for t, _ in times),
                   "us_per_pair": 1e6 * median / pairs, "book_median_ms": 1e3 * book,
                   "book_us_per_pair": 1e6 * book / pairs}
            result[part].append(row)
            print(json.dumps({"part": part, **row}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    write_md(args.out)
    print((args.out / "pair_mixer_bench.md").read_text())


if __name__ == "__main__":
    main()
