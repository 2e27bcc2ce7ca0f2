"""Run (or resume) the method comparison: the same function as `onpolicy-sft compare`.

    python experiments/compare.py --config experiments/configs/compare_cpu.yaml [--set seeds=[0]]
"""

from __future__ import annotations

import argparse
import logging

from onpolicy_sft.compare import load_compare_config, run_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML comparison config; the embedded CPU defaults when omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = run_comparison(load_compare_config(args.config, args.overrides))
    print(summary["table"])
    for note in summary["notes"]:
        print(f"- {note}")


if __name__ == "__main__":
    main()
