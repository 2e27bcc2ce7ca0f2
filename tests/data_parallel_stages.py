"""Every data-parallel stage of evaluation and pairs on a tiny checkpoint, for tests/test_data_parallel.py.

Run once as one plain process and once under ``torchrun --nproc_per_node 2``: each process loads
its own copy of the model and its own hf backend. The main process writes everything the stages
returned to ``OUT/results.json``; the test compares the two runs.

    python tests/data_parallel_stages.py MODEL_DIR OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from decoding.sampling import SamplingConfig
from onpolicy_sft import ddt
from onpolicy_sft.arith import arithmetic_splits
from onpolicy_sft.config import EvalConfig
from onpolicy_sft.evaluate import base_responses, evaluate, forgetting
from onpolicy_sft.models import load_model
from onpolicy_sft.preference_pairs import build_pairs
from onpolicy_sft.run import process_state

ROWS = 5  # odd: the two processes get 3 and 2 rows


def main(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    state = process_state()
    model, tokenizer = load_model(model_dir, dtype=torch.float32, device="cpu")
    tuned, _ = load_model(model_dir, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    splits = arithmetic_splits(n_train=ROWS, n_test=ROWS, n_test_hard=1)
    config = EvalConfig(max_new_tokens=6, n_samples=3, temperature=1.0, pass_k=[1, 2], seed=5)
    metrics = evaluate(model, tokenizer, splits["test"], config, out_dir=Path(out) / "eval")
    prompts = list(splits["train"]["prompt"])
    responses = base_responses(model, tokenizer, prompts, max_new_tokens=5)
    kl = forgetting(model, tuned, tokenizer, prompts, responses=responses, batch_size=2, chunk_tokens=7)
    pairs, counts = build_pairs(model, tokenizer, splits["train"], k=2, sampling=SamplingConfig(max_new_tokens=5),
                                seed=2)
    scored = ddt.score(model, tokenizer, splits["train"], batch_tokens=64, progress=False, per_token=True,
                       out_dir=Path(out) / "ddt")
    if state.is_main_process:
        results = {
            "metrics": metrics, "eval_rows": (Path(out) / "eval" / "results.jsonl").read_text().splitlines(),
            "responses": responses, "forgetting": kl, "pairs": pairs.to_list(), "pair_counts": counts,
            "ddt": {c: list(scored[c]) for c in scored.column_names if c.startswith("ddt_")},
            "ddt_record": json.loads((Path(out) / "ddt" / "scoring.json").read_text()),
        }
        (Path(out) / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
