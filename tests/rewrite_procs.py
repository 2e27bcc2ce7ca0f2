"""Driver for the multi-process rewrite test (test_rewrite.py): run with python or torchrun.

    rewrite_procs.py OUT_DIR RESULT_JSON [--fail-rank R --fail-on-sample K] [--backend vllm --hidden 256] [--options]

The tiny model is built from a fixed seed on every process (hidden 256 for vLLM's CPU attention),
the verdict is a deterministic stand-in (so that every source occurs with hf), and the rank given
by --fail-rank exits hard on its K-th sampling call, as a killed process would. --options turns on
the triage (mean φ below 0.2 flagged: 4 of the 9 rows), keep_verified 2 and adaptive sampling.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import onpolicy_sft.rewrite as rw  # noqa: E402
from decoding import HintedDecodingConfig, SamplingConfig, make_backend  # noqa: E402
from onpolicy_sft.rewrite_config import RewriteConfig, TriageConfig  # noqa: E402
from onpolicy_sft.run import process_state  # noqa: E402
from test_rewrite import _accept_some, _corpus  # noqa: E402
from tiny import make_tiny_model, make_tiny_tokenizer  # noqa: E402


class DiesOnSample:
    def __init__(self, inner, fail_on_sample):
        self.inner, self.fail_on_sample, self.calls = inner, fail_on_sample, 0

    def sample(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_sample:
            os._exit(3)
        return self.inner.sample(*args, **kwargs)

    def two_stream(self, *args, **kwargs):
        return self.inner.two_stream(*args, **kwargs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("result")
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--fail-on-sample", type=int, default=0)
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--options", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rw.is_correct = _accept_some
    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok, seed=0, **({"hidden": args.hidden} if args.hidden else {}))
    config = RewriteConfig(k_self=2, m_hinted=2, shard_size=2, seed=5, progress=False,
                           sampling=SamplingConfig(temperature=1.0, max_new_tokens=6),
                           hinted=HintedDecodingConfig(temperature=1.0, max_new_tokens=6))
    if args.options:
        config = RewriteConfig(**{**config.__dict__, "k_self": 4, "keep_verified": 2, "adaptive": True,
                                  "triage": TriageConfig(by="phi", level=0.2)})
    state = process_state()
    backend = make_backend(args.backend, model, tok, **({"max_model_len": 1024} if args.backend == "vllm" else {}))
    if state.process_index == args.fail_rank:
        backend = DiesOnSample(backend, args.fail_on_sample)
    ds, stats = rw.rewrite_corpus(model, tok, _corpus(9), config, out_dir=args.out, backend=backend)
    if state.is_main_process:
        Path(args.result).write_text(json.dumps({"rows": ds.to_list(), "stats": stats}))
    if args.backend == "vllm":
        backend.close()


if __name__ == "__main__":
    main()
