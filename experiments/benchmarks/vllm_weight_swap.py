"""How the loop's vLLM engine should serve new weights after a training round.

Three ways, timed on the embedded model after a real change of weights (one SFT-like
perturbation of every parameter): update the running engine from the in-memory model
(``Backend.update_weights(model)``), update it from the saved checkpoint
(``update_weights(path)``), or shut the engine down and start a new one on the checkpoint. Each
way must then serve the NEW weights: greedy completions are compared with the HF model's.

    flock /tmp/bench.lock .venv/bin/python experiments/benchmarks/vllm_weight_swap.py

Writes experiments/benchmarks/results/vllm_weight_swap.{json,md}.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["What is 17 + 25? Put the answer in \\boxed{}.", "Name a colour.", "Write one word.", "What is 6 * 7?"]


def main() -> None:
    from decoding import make_backend
    from decoding.sampling import SamplingConfig
    from decoding.hf import hf_sample
    from onpolicy_sft.encoding import encode_prompt
    from onpolicy_sft.models import load_model

    model, tokenizer = load_model(dtype=torch.float32)
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=24)
    backend = make_backend("vllm", model, tokenizer, max_model_len=1024)
    before = backend.sample(prompts, greedy)

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.abs().mean())
    expected = hf_sample(model, prompts, greedy, tokenizer)
    ckpt = tempfile.mkdtemp(prefix="swap-bench-")
    model.save_pretrained(ckpt, safe_serialization=True)
    tokenizer.save_pretrained(ckpt)

    timings, agree = {}, {}
    for name, source in (("update_in_memory", model), ("update_from_checkpoint", ckpt)):
        start = time.perf_counter()
        backend.update_weights(source)
        timings[name] = time.perf_counter() - start
        agree[name] = backend.sample(prompts, greedy) == expected
    start = time.perf_counter()
    backend.close()
    backend = make_backend("vllm", ckpt, tokenizer, max_model_len=1024)
    timings["new_engine_from_checkpoint"] = time.perf_counter() - start
    agree["new_engine_from_checkpoint"] = backend.sample(prompts, greedy) == expected
    backend.close()

    best = min(timings, key=timings.get)
    report = {"seconds": {k: round(v, 3) for k, v in timings.items()}, "serves_new_weights": agree,
              "weights_changed_output": before != expected, "fastest": best}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vllm_weight_swap.json").write_text(json.dumps(report, indent=2))
    lines = ["# vLLM: serving new weights after a training round (SmolLM2-135M, CPU, float32)", "",
             "| way | seconds | greedy output = HF model's |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {agree[k]} |" for k, v in timings.items()]
    lines += ["", f"Fastest: **{best}**; the loop uses `Backend.update_weights(model)` (in place)."]
    (RESULTS / "vllm_weight_swap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
