"""Training throughput on the embedded model: our trainer against ``transformers.Trainer``.

Both train SmolLM2-135M-Instruct with plain SFT on the SAME batches (fixed-length rows, so no
padding and the same tokens per step whatever the order), AdamW, float32 on CPU. We time every
optimizer step and drop the first (allocation and warm-up). Whichever trainer runs first in a
process is slower (allocator and cache warm-up; ours ran 25 % slower first than second here),
so the trainers run in alternating order over ``--rounds`` runs each and tokens/s comes from the
median step; it counts every token the forward pass sees. Model-FLOPs utilisation (MFU) uses the
usual training cost of 6·N + 12·L·d·T FLOPs per token (forward + backward; N parameters taking
part in matmuls, including the tied lm_head; L layers, d hidden size, T sequence length;
Chowdhery et al. 2022, appendix B) against this machine's float32 matmul rate, measured here on the model's own GEMM
shapes and on a square 2048³ product (the best of the two is the peak).

    flock /tmp/bench.lock .venv/bin/python experiments/benchmarks/train_bench.py [--steps 4] [--rounds 2]

Writes experiments/benchmarks/results/train_bench.{json,md}. With ``--state`` it instead measures
what resuming costs on the same model: writing and reading the resume state (safetensors and
JSON), its size, and the run's input fingerprint (weights identity and data digest), into
experiments/benchmarks/results/train_state_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def matmul_rate(m: int, k: int, n: int, seconds: float = 3.0) -> float:
    """Sustained float32 GFLOP/s of an [m, k] @ [k, n] product."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def make_rows(tokenizer, n_rows: int, length: int, prompt_len: int, seed: int = 0) -> list[dict]:
    """Fixed-length rows of random token ids; the first ``prompt_len`` positions are prompt (no label)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        ids = torch.randint(len(tokenizer) // 10, len(tokenizer), (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return rows


def ours(model, tokenizer, rows, batch_size: int, steps: int) -> list[float]:
    import datasets

    from onpolicy_sft.config import ObjectiveConfig, TrainConfig
    from onpolicy_sft.train import train

    config = TrainConfig(objective=ObjectiveConfig(name="sft"), lr=1e-5, batch_size=batch_size,
                         micro_batch_size=batch_size, max_steps=steps, warmup_ratio=0.0, trackers=["jsonl"],
                         progress=False, max_length=10**6)
    with tempfile.TemporaryDirectory() as out:
        train(model, tokenizer, datasets.Dataset.from_list(rows), config, out_dir=out)
        log = [json.loads(line) for line in (Path(out) / "logs" / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r["train/step_seconds"] for r in log]


def hf_trainer(model, tokenizer, rows, batch_size: int, steps: int) -> list[float]:
    import datasets
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from onpolicy_sft.encoding import collate

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=1e-5,
            adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.01, lr_scheduler_type="constant", max_grad_norm=1.0,
            logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
            dataloader_num_workers=0, seed=0, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          data_collator=lambda batch: collate(batch, tokenizer.pad_token_id or 0), callbacks=[timer])
        trainer.train()
    return timer.seconds


def state_costs(model, tokenizer, rows, repeats: int = 3) -> dict:
    """Seconds to save and load the resume state, its bytes, and seconds to fingerprint the run."""
    import datasets
    from accelerate import Accelerator

    from onpolicy_sft.config import ObjectiveConfig, TrainConfig
    from onpolicy_sft.train import setup_optimizer
    from onpolicy_sft.train_state import _data_digest, _model_identity, latest_state, load_state, save_state

    config = TrainConfig(objective=ObjectiveConfig(name="sft"), lr=1e-5)
    optimizer, scheduler = setup_optimizer(model, config, total_steps=10)
    model(input_ids=torch.tensor([rows[0]["input_ids"]])).logits.float().mean().backward()
    optimizer.step()  # the AdamW moments exist, as in a real state
    optimizer.zero_grad()
    scheduler.step()
    accelerator = Accelerator(cpu=True)
    ds = datasets.Dataset.from_list(rows)
    timings = {"save_state": [], "load_state": [], "model_identity": [], "data_digest": []}
    with tempfile.TemporaryDirectory() as out:
        for step in range(1, repeats + 1):
            start = time.perf_counter()
            save_state(accelerator, model, optimizer, scheduler, Path(out), step)
            timings["save_state"].append(time.perf_counter() - start)
            start = time.perf_counter()
            load_state(accelerator, model, optimizer, scheduler, latest_state(Path(out))[1])
            timings["load_state"].append(time.perf_counter() - start)
            for name, fn in (("model_identity", lambda: _model_identity(model)), ("data_digest", lambda: _data_digest(ds))):
                start = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in latest_state(Path(out))[1].iterdir())
    return {"seconds": {k: round(statistics.median(v), 3) for k, v in timings.items()}, "state_bytes": size,
            "data_rows": len(rows), "data_tokens": sum(len(r["input_ids"]) for r in rows), "repeats": repeats}


def state_main(args) -> None:
    from onpolicy_sft.models import load_model
    from onpolicy_sft.rundir import write_json, write_text

    torch.manual_seed(0)
    model, tokenizer = load_model(dtype=torch.float32)
    rows = make_rows(tokenizer, args.state_rows, args.length, args.prompt_length)
    costs = state_costs(model, tokenizer, rows)
    n_params = sum(p.numel() for p in model.parameters())
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__}, "model_parameters": n_params, **costs}
    write_json(RESULTS / "train_state_bench.json", report)
    s = costs["seconds"]
    lines = [
        "# Resume state and fingerprint costs of onpolicy_sft.train",
        "",
        f"SmolLM2-135M-Instruct ({n_params / 1e6:.0f} M parameters), float32, AdamW state, "
        f"{torch.get_num_threads()} threads; median of {costs['repeats']} repeats. "
        f"Data digest over {costs['data_rows']} rows ({costs['data_tokens']} tokens).",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| save_state (weights + optimizer safetensors, scheduler/RNG JSON) | {s['save_state']} |",
        f"| load_state | {s['load_state']} |",
        f"| starting-model identity (fingerprint) | {s['model_identity']} |",
        f"| data digest (fingerprint) | {s['data_digest']} |",
        "",
        f"State size: {costs['state_bytes'] / 2**20:.0f} MiB.",
        "",
        "    flock /tmp/heavy.lock .venv/bin/python experiments/benchmarks/train_bench.py --state",
    ]
    write_text(RESULTS / "train_state_bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (plus one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each trainer, in alternating order")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--state", action="store_true", help="measure resume state and fingerprint costs instead")
    parser.add_argument("--state-rows", type=int, default=2000, help="rows for the data digest of --state")
    args = parser.parse_args()
    if args.state:
        return state_main(args)

    from onpolicy_sft.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(dtype=torch.float32)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())  # tied lm_head counted once: it is one matmul
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.length
    rates = {
        "gemm_tokens1024_576x1536": matmul_rate(1024, cfg.hidden_size, cfg.intermediate_size),
        "gemm_tokens1024_576x49152": matmul_rate(1024, cfg.hidden_size, cfg.vocab_size),
        "gemm_2048_cubed": matmul_rate(2048, 2048, 2048),
    }
    peak = max(rates.values())
    steps = args.steps + 1
    rows = make_rows(tokenizer, steps * args.batch_size, args.length, args.prompt_length)
    tokens_per_step = args.batch_size * args.length
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    trainers = [("onpolicy_sft", ours), ("transformers_trainer", hf_trainer)]
    seconds = {name: [] for name, _ in trainers}
    for round_ in range(args.rounds):
        for name, fn in trainers if round_ % 2 == 0 else trainers[::-1]:
            model.load_state_dict(initial)
            model.train()
            seconds[name] += fn(model, tokenizer, rows, args.batch_size, steps)[1:]
    results = {}
    for name, timed in seconds.items():
        tps = tokens_per_step / statistics.median(timed)
        results[name] = {"step_seconds": [round(s, 3) for s in timed], "tokens_per_s": round(tps, 1),
                         "mfu": round(tps * flops_per_token / (peak * 1e9), 4)}
    speedup = results["onpolicy_sft"]["tokens_per_s"] / results["transformers_trainer"]["tokens_per_s"]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "model": {"parameters": n_params, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size},
        "batches": {"rows_per_step": args.batch_size, "tokens_per_row": args.length,
                    "labelled_tokens_per_row": args.length - args.prompt_length, "timed_steps": args.steps,
                    "rounds": args.rounds},
        "flops_per_token": flops_per_token,
        "float32_matmul_gflops": {k: round(v, 1) for k, v in rates.items()},
        "peak_gflops": round(peak, 1),
        "results": results,
        "speedup_vs_trainer": round(speedup, 3),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_bench.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Training throughput: onpolicy_sft.train vs transformers.Trainer",
        "",
        f"SmolLM2-135M-Instruct, float32, {torch.get_num_threads()} threads, SFT, {args.batch_size}×{args.length}-token "
        f"steps (same rows for both), {args.rounds} runs of each in alternating order, {args.steps} timed steps "
        "per run after one warm-up step; tokens/s from the median step.",
        f"MFU = tokens/s × {flops_per_token / 1e6:.0f} MFLOP/token ÷ peak {peak:.1f} GFLOP/s (best measured float32 GEMM).",
        "",
        "| trainer | tokens/s | MFU | step seconds |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {100 * r['mfu']:.1f}% | {', '.join(map(str, r['step_seconds']))} |")
    lines += ["", f"Speed-up over transformers.Trainer: **{speedup:.2f}×** (goal ≥ 1.0×).", "",
              "float32 matmul rates (GFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())]
    (RESULTS / "train_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
