"""Smoke test of Hinted Decoding for a user with one GPU and vLLM installed (about 5 minutes).

    python experiments/gpu_smoke.py                       # hf and vLLM, the embedded model
    python experiments/gpu_smoke.py --model Qwen/Qwen2.5-0.5B-Instruct
    python experiments/gpu_smoke.py --hf-only             # no vLLM needed; runs on a CPU too

Checks, in float32 (greedy decoding is only comparable across kernels at full precision):
1. hf: greedy Hinted Decoding equals the plain reference loop (one pair at a time, no cache).
2. vLLM: the same greedy ids; then `--pairs` pairs in one chunk return in lock-step.
3. vLLM weight update: after one training step on the hf model, the engine's prompt log-probs
   equal the trained model's (max |difference| below --logp-tol).
4. vLLM sleep / wake: sleep frees GPU memory (measured), wake_up reloads the trained weights,
   and the log-probs still match.
5. Throughput: two-stream tokens/s per pair against plain sampling of the same prompts.
Prints one JSON object and exits non-zero if a check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decoding import HintedDecodingConfig, SamplingConfig, make_backend  # noqa: E402
from decoding.hf import hf_sample, hf_two_stream  # noqa: E402
from decoding.reference import reference_two_stream  # noqa: E402
from onpolicy_sft.arith import arithmetic_splits  # noqa: E402
from onpolicy_sft.hint_template import HintTemplate, hinted_prompt_ids, student_prompt_ids  # noqa: E402
from onpolicy_sft.models import load_model  # noqa: E402


def prompts(tok, n: int):
    rows = arithmetic_splits(n_train=n)["train"]
    hinted = [hinted_prompt_ids(tok, HintTemplate(), r["prompt"], r["response"]) for r in rows]
    student = [student_prompt_ids(tok, r["prompt"]) for r in rows]
    return hinted, student, [r["response"] for r in rows]


def train_step(model, tok, prompts_ids, responses) -> None:
    """One SGD step of plain SFT on a few demonstrations, so that the weights really change."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    device = next(model.parameters()).device
    for prompt, response in zip(prompts_ids[:4], responses[:4]):
        ids = prompt + tok(response, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 :], torch.tensor(ids[len(prompt) :], device=device))
        loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def hf_logps(model, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        logq = torch.log_softmax(model(torch.tensor([ids], device=device)).logits[0, :-1].float(), -1)
    return logq.gather(-1, torch.tensor(ids[1:], device=device).unsqueeze(-1)).squeeze(-1).cpu()


def vllm_logps(backend, ids: list[int]) -> torch.Tensor:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    out = backend.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    return torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--hf-only", action="store_true", help="skip every vLLM check (no vllm needed)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--check-pairs", type=int, default=4, help="pairs compared with the reference loop")
    parser.add_argument("--logp-tol", type=float, default=2e-3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dtype=torch.float32, device=device)
    hinted, student, responses = prompts(tok, args.pairs)
    k = args.check_pairs
    greedy = HintedDecodingConfig(temperature=0.0, max_new_tokens=args.new_tokens, batch_size=args.pairs)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": args.model,
                    "checks": {}}
    checks = report["checks"]

    t_ref, want = timed(lambda: reference_two_stream(model, hinted[:k], student[:k], greedy, tok))
    t_hf, got = timed(lambda: hf_two_stream(model, hinted[:k], student[:k], greedy, tok))
    checks["hf_greedy_equals_reference"] = got == want
    report["hf_two_stream_tokens_per_s"] = sum(map(len, got)) / t_hf
    report["reference_tokens_per_s"] = sum(map(len, want)) / t_ref

    if not args.hf_only:
        backend = make_backend("vllm", model, tok, max_model_len=2048, max_num_seqs=2 * args.pairs, dtype="float32",
                               gpu_memory_utilization=args.gpu_memory_utilization)
        report["vllm_engine_in_process"] = backend.in_process
        checks["vllm_greedy_equals_reference"] = backend.two_stream(hinted[:k], student[:k], greedy, tok) == want
        sampled = HintedDecodingConfig(temperature=0.3, max_new_tokens=args.new_tokens, batch_size=args.pairs)
        t_two, two = timed(lambda: backend.two_stream(hinted, student, sampled, tok))  # raises on lost lock-step
        checks["vllm_lock_step_all_pairs"] = len(two) == args.pairs
        t_one, one = timed(lambda: backend.sample(student, SamplingConfig(temperature=0.3, max_new_tokens=args.new_tokens)))
        report["two_stream_tokens_per_s"] = sum(map(len, two)) / t_two
        report["sample_tokens_per_s"] = sum(len(c[0]) for c in one) / t_one
        report["two_stream_vs_sample"] = report["two_stream_tokens_per_s"] / report["sample_tokens_per_s"]

        probe = hinted[0] + two[0]
        train_step(model, tok, student, responses)
        backend.update_weights(model)
        diff = (vllm_logps(backend, probe) - hf_logps(model, probe)).abs().max().item()
        report["logp_max_diff_after_update"] = diff
        checks["vllm_weight_update_matches_trained_model"] = diff < args.logp_tol

        free = torch.cuda.mem_get_info()[0] if device == "cuda" else 0
        backend.sleep()
        report["sleep_freed_gib"] = ((torch.cuda.mem_get_info()[0] - free) / 2**30) if device == "cuda" else None
        train_step(model, tok, student, responses)
        backend.wake_up(model)
        diff = (vllm_logps(backend, probe) - hf_logps(model, probe)).abs().max().item()
        report["logp_max_diff_after_wake"] = diff
        checks["vllm_wake_serves_trained_model"] = diff < args.logp_tol
        backend.close()
    else:
        sc = SamplingConfig(temperature=0.3, max_new_tokens=args.new_tokens)
        sampled = HintedDecodingConfig(temperature=0.3, max_new_tokens=args.new_tokens, batch_size=args.pairs)
        t_two, two = timed(lambda: hf_two_stream(model, hinted, student, sampled, tok))
        t_one, one = timed(lambda: hf_sample(model, student, sc, tok, batch_rows=args.pairs))
        report["two_stream_tokens_per_s"] = sum(map(len, two)) / t_two
        report["sample_tokens_per_s"] = sum(len(c[0]) for c in one) / t_one
        report["two_stream_vs_sample"] = report["two_stream_tokens_per_s"] / report["sample_tokens_per_s"]
    report["ok"] = all(checks.values())
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
