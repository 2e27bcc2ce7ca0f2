"""Prepared GPU benchmark: our trainer against transformers.Trainer, and the fused loss against Liger-Kernel.

1. Training throughput on a randomly initialised Qwen2.5-1.5B-shaped model (vocabulary 151936,
   28 layers, hidden 1536, tied embeddings): ``onpolicy_sft.train`` and ``transformers.Trainer``
   run plain SFT on the SAME fixed-length rows (so no padding, the same tokens per step), float32
   master weights with bf16 autocast, AdamW (torch's, not fused, for both), one warm-up step and
   ``--steps`` timed ones; tokens/s from the median step. MFU uses the training cost
   6·N + 12·L·d·T FLOPs per token (Chowdhery et al. 2022, appendix B; N counts the tied
   embedding once, as the lm_head matmul) against ``--peak-tflops`` (H200 bf16 dense: ~790).
2. The loss head alone at V = 151936, N = 32768 tokens, H = 1536, bf16 inputs: forward +
   backward of our fused SFT loss (``objectives.build("sft").fused``), Liger-Kernel's
   ``LigerFusedLinearCrossEntropyLoss`` (skipped when liger_kernel is not installed), and the
   plain full-logits cross-entropy as the reference; median time and peak memory above the
   inputs, plus each one's largest gradient difference from the reference.

Runs in well under 10 minutes on one H200 (no downloads; needs torch, transformers and
accelerate; without the datasets package the rows go to ``train`` as a small stand-in table,
which needs pyarrow)::

    python experiments/benchmarks/gpu_train_bench.py
    python experiments/benchmarks/gpu_train_bench.py --dry-run   # CPU-sized shapes: checks that it all runs

Writes experiments/benchmarks/results/gpu_train_bench.{json,md} (a dry run writes
gpu_train_bench_dry_run.{json,md} instead, so it never replaces measured rows).
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
import torch.nn.functional as F

from onpolicy_sft.config import ObjectiveConfig, TrainConfig
from onpolicy_sft.encoding import collate
from onpolicy_sft.objectives import build
from onpolicy_sft.train import METRICS_FILE, train

RESULTS = Path(__file__).parent / "results"
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


class RowTable:
    """The few ``datasets.Dataset`` methods ``train`` reads of already tokenized rows, for a GPU
    machine without the datasets package (pyarrow is still needed)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    @property
    def column_names(self) -> list[str]:
        return list(self.rows[0])

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, column: str) -> list:
        return [r[column] for r in self.rows]

    def select(self, indices) -> "RowTable":
        return RowTable([self.rows[i] for i in indices])

    def select_columns(self, columns) -> "RowTable":
        return RowTable([{c: r[c] for c in columns} for r in self.rows])

    def with_format(self, kind: str) -> "RowTable":
        if kind != "arrow":
            raise ValueError(f"RowTable only stands in for the arrow format, not {kind!r}")
        return self

    def iter(self, batch_size: int):
        """Batches as pyarrow tables (what ``train`` reads of ``with_format("arrow")``)."""
        import pyarrow

        for start in range(0, len(self.rows), batch_size):
            yield pyarrow.Table.from_pylist(self.rows[start : start + batch_size])


def as_dataset(rows: list[dict]):
    try:
        import datasets
    except ImportError:
        return RowTable(rows)
    return datasets.Dataset.from_list(rows)


class IdTokenizer:
    """What ``train`` needs of a tokenizer when the rows are already token ids: a pad id, and saving nothing."""

    pad_token_id = 0
    eos_token_id = 0

    def save_pretrained(self, path) -> None:
        pass


def make_model(shape: dict, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**shape, attn_implementation="sdpa")
    with device:  # initialised where it runs: a 1.5B model's random init on the CPU alone takes a while
        return Qwen2ForCausalLM(config)


def make_rows(vocab: int, n_rows: int, length: int, prompt_length: int) -> list[dict]:
    """Fixed-length rows of random ids; the first ``prompt_length`` positions carry no label."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n_rows):
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt_length + ids[prompt_length:]})
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(model, rows, args, mixed: str) -> list[float]:
    config = TrainConfig(objective=ObjectiveConfig(name="sft"), lr=1e-5, batch_size=args.batch_size,
                         micro_batch_size=args.micro_batch_size, max_steps=args.steps + 1, warmup_ratio=0.0,
                         trackers=["jsonl"], progress=False, max_length=10**6, mixed_precision=mixed)
    with tempfile.TemporaryDirectory() as out:
        train(model, IdTokenizer(), as_dataset(rows), config, out_dir=out)
        log = [json.loads(line) for line in (Path(out) / METRICS_FILE).read_text().splitlines()]
    return [r["train/step_seconds"] for r in log]


def hf_trainer(model, rows, args, mixed: str) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    device = next(model.parameters()).device

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.seconds.append(time.perf_counter() - self.start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.batch_size // args.micro_batch_size, max_steps=args.steps + 1,
            learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.01, lr_scheduler_type="constant",
            max_grad_norm=1.0, optim="adamw_torch", logging_strategy="no", save_strategy="no", report_to=[],
            use_cpu=device.type == "cpu", bf16=mixed == "bf16", dataloader_num_workers=0, seed=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=rows,
                          data_collator=lambda batch: collate(batch, 0), callbacks=[timer])
        trainer.train()
    return timer.seconds


def trainer_rows(args, device: torch.device, shape: dict, mixed: str) -> list[dict]:
    model = make_model(shape, device)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.length
    rows = make_rows(cfg.vocab_size, (args.steps + 1) * args.batch_size, args.length, args.prompt_length)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for name, fn in (("onpolicy_sft", ours), ("transformers_trainer", hf_trainer)):
        model.load_state_dict(initial)
        model.train()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = fn(model, rows, args, mixed)[1:]  # the first step warms up
        tps = args.batch_size * args.length / statistics.median(seconds)
        out.append({"part": "trainer", "name": name, "parameters": n_params, "tokens_per_step":
                    args.batch_size * args.length, "step_seconds": [round(s, 4) for s in seconds],
                    "tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token / (args.peak_tflops * 1e12), 4),
                    "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda"
                    else None})
        print(out[-1], flush=True)
    del model
    return out


def loss_rows(args, device: torch.device, vocab: int, hidden_size: int, dtype: torch.dtype) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    hidden0 = torch.randn(args.tokens, hidden_size, device=device, dtype=dtype, generator=g)
    weight0 = (torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=g) * 0.02)
    labels = torch.randint(0, vocab, (args.tokens,), device=device, generator=g)
    sft = build("sft")

    def run_ours(h, w):
        return sft.fused(h, w, labels)[0]

    def run_full(h, w):
        return F.cross_entropy((h @ w.T).float(), labels)

    ways = [("full_logits", run_full), ("onpolicy_sft_fused", run_ours)]
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        ways.append(("liger_fused_linear_ce", lambda h, w: liger(w, h, labels)))
    except ImportError:
        print("liger_kernel is not installed: its row is skipped", flush=True)

    out, reference = [], None
    for name, fn in ways:
        h = hidden0.clone().requires_grad_(True)
        w = weight0.clone().requires_grad_(True)

        def step():
            h.grad = w.grad = None
            loss = fn(h, w)
            loss.backward()
            return loss

        step()  # warm-up (kernel compilation for Liger)
        sync(device)
        times = []
        base = 0
        for _ in range(args.loss_repeats):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss = step()
            sync(device)
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
        grads = (float(loss.detach().float()), h.grad.float(), w.grad.float())
        if reference is None:
            reference = grads
        row = {"part": "loss", "name": name, "tokens": args.tokens, "vocab": vocab, "hidden": hidden_size,
               "dtype": str(dtype), "median_ms": round(1000 * statistics.median(times), 2),
               "peak_memory_gib": round(peak, 3) if peak is not None else None,
               "loss_diff": abs(grads[0] - reference[0]),
               "grad_hidden_max_diff": float((grads[1] - reference[1]).abs().max()),
               "grad_weight_max_diff": float((grads[2] - reference[2]).abs().max())}
        out.append(row)
        print(row, flush=True)
        del h, w, grads
    return out


def _cell(value, form: str) -> str:
    """A number in ``form``, or a text cell ("not run") as it is."""
    return value if isinstance(value, str) else format(value, form)


def write_tables(path: Path, meta: dict, rows: list[dict]) -> None:
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = ["# GPU: our trainer vs transformers.Trainer, fused loss vs Liger-Kernel", "", f"`{meta['command']}`", "",
             f"Device: {meta['device']}. {meta['note']}", "",
             "| trainer | model | tokens/step | tokens/s | MFU | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "trainer":
            lines.append(f"| {r['name']} | {meta['model']} | {r['tokens_per_step']} | {r['tokens_per_s']} | "
                         f"{_cell(r['mfu'], '.1%')} | {r['peak_memory_gib']} |")
    lines += ["", "| loss head | N × V × H | ms (fwd+bwd) | peak GiB | max grad diff vs full logits |",
              "|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "loss":
            lines.append(f"| {r['name']} | {meta['loss_shape']} | {r['median_ms']} | {r['peak_memory_gib']} | "
                         f"{_cell(r['grad_weight_max_diff'], '.2e')} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU-sized shapes, float32: checks that everything runs")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per trainer (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32768, help="N of the loss-head comparison")
    parser.add_argument("--loss-repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense bf16 peak")
    args = parser.parse_args()

    if args.dry_run:
        device, shape, mixed, dtype = torch.device("cpu"), TINY, "no", torch.float32
        args.steps, args.batch_size, args.micro_batch_size, args.length, args.prompt_length = 2, 4, 2, 64, 16
        args.tokens, args.loss_repeats = 256, 2
        out = RESULTS / "gpu_train_bench_dry_run"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --dry-run to check the script on CPU")
        device, shape, mixed, dtype = torch.device("cuda"), QWEN25_15B, "bf16", torch.bfloat16
        out = RESULTS / "gpu_train_bench"
    started = time.perf_counter()
    rows = trainer_rows(args, device, shape, mixed)
    rows += loss_rows(args, device, shape["vocab_size"], shape["hidden_size"], dtype)
    command = "python experiments/benchmarks/gpu_train_bench.py" + (" --dry-run" if args.dry_run else "")
    meta = {"command": command, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.machine(),
            "model": "Qwen2.5-1.5B-shaped, random init" if not args.dry_run else "tiny Qwen2 (dry run)",
            "loss_shape": f"{args.tokens} × {shape['vocab_size']} × {shape['hidden_size']}",
            "note": (f"SFT, {args.batch_size}×{args.length}-token steps in micro-batches of {args.micro_batch_size}, "
                     f"{'bf16 autocast over float32 weights' if mixed == 'bf16' else 'float32'}, {args.steps} timed "
                     f"steps; MFU against {args.peak_tflops:g} TFLOP/s."),
            "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1)}
    write_tables(out, meta, rows)
    print((out.with_suffix(".md")).read_text())


if __name__ == "__main__":
    main()
