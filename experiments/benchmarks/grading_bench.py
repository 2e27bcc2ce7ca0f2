"""Answer extraction on hostile model output: time of ``last_boxed`` on n unterminated boxes, against
the rescanning reading it replaced (quadratic), and ``is_correct`` on a 4301-digit answer.

    .venv/bin/python experiments/benchmarks/grading_bench.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from onpolicy_sft.grading import is_correct, last_boxed  # noqa: E402
from test_grading import last_boxed_by_rescanning  # noqa: E402  (the test's oracle, the reading last_boxed replaced)

RESULTS = Path(__file__).parent / "results"


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 8000, 200_000])
    ap.add_argument("--old-up-to", type=int, default=2000, help="time the quadratic reading only up to this size")
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        text = "\\boxed{42} " + "\\boxed{" * n
        row = {"unterminated_boxes": n, "chars": len(text), "last_boxed_s": round(seconds(last_boxed, text), 4)}
        if n <= args.old_up_to:
            row["rescanning_s"] = round(seconds(last_boxed_by_rescanning, text), 4)
        rows.append(row)
    big = "1" * 4301
    digits = {"is_correct_4301_digits_s": round(seconds(is_correct, f"\\boxed{{{big}}}", "2"), 4),
              "result": is_correct(f"\\boxed{{{big}}}", "2")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grading_bench.json").write_text(json.dumps({"last_boxed": rows, "huge_number": digits}, indent=2) + "\n")
    lines = ["# grading_bench", "", "`.venv/bin/python experiments/benchmarks/grading_bench.py` (2 shared AMD EPYC cores, Python 3.11)",
             "", "| unterminated boxes | chars | last_boxed (s) | rescanning reading (s) |", "|---|---|---|---|"]
    lines += [f"| {r['unterminated_boxes']} | {r['chars']} | {r['last_boxed_s']} | {r.get('rescanning_s', '—')} |"
              for r in rows]
    lines += ["", f"`is_correct` of a 4301-digit boxed answer against 2: {digits['result']} in "
              f"{digits['is_correct_4301_digits_s']} s (it raised ValueError before)."]
    (RESULTS / "grading_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
