"""Hinted Decoding at real lengths and batch sizes (issue 14).

1. `length`: ms per decode step at 256, 1024 and 4096 new tokens, hf and vLLM, on a tiny random
   model (the forward pass is cheap, so what grows is ours), split into the model's forward pass
   and everything else (mixing, answer guard, stop rules, bookkeeping). Goal: everything else flat
   within 1.2x from 256 to 4096. Also the answer-guard check alone per token: the tail watch
   against a whole-text decode (what the guard did before).
2. `throughput`: vLLM two-stream tokens/s per pair against plain sampling of the same student
   prompts, at batch 8, 32 and 64 pairs, on the embedded model (goal >= 0.45x), and a profile of
   where one two-stream call's time goes (the mixer against the rest of the engine).

    flock /tmp/heavy.lock .venv/bin/python experiments/benchmarks/decoding_length_bench.py [--part length|throughput|all]

Each vLLM measurement runs in its own child process (one engine per process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from decoding import HintedDecodingConfig, SamplingConfig, make_backend  # noqa: E402
from decoding import hf  # noqa: E402
from decoding.hf import hf_two_stream  # noqa: E402
from decoding.mixing import draw, hinted_step, mix_logprobs, stream_keys, top_p_mask, uniforms  # noqa: E402
from decoding.pairs import PairBook, pair_spec  # noqa: E402
from decoding.rules import ANSWER_MARKERS, RepetitionStop, TailWatch, text_contains  # noqa: E402
from onpolicy_sft.arith import arithmetic_splits  # noqa: E402
from onpolicy_sft.hint_template import HintTemplate, hinted_prompt_ids, student_prompt_ids  # noqa: E402
from onpolicy_sft.models import load_tokenizer, resolve_model_path  # noqa: E402
from tiny import make_tiny_model, make_tiny_tokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LENGTHS = (256, 1024, 4096)


class ForwardClock:
    """Seconds spent inside a module's forward pass (hooks around every call)."""

    def __init__(self, module):
        self.total, self._start = 0.0, 0.0
        module.register_forward_pre_hook(lambda *_: self._begin())
        module.register_forward_hook(lambda *_: self._end())

    def _begin(self):
        self._start = time.perf_counter()

    def _end(self):
        self.total += time.perf_counter() - self._start


def _tiny(max_len: int):
    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok, seed=0, hidden=256)
    model.config.max_position_embeddings = max_len  # rotary positions have no cap; vLLM reads this one
    model.generation_config.eos_token_id = None  # rows run to the length asked for, unless they write
    model.config.eos_token_id = None              # the tokenizer's eos (kept: the guard needs the tokenizer)
    return model, tok


def _pairs(tok, batch: int):
    hinted = [tok(f"Hint: {i}*7={i * 7}. Q: {i}*7?")["input_ids"] for i in range(batch)]
    student = [tok(f"Q: {i}*7?")["input_ids"] for i in range(batch)]
    return hinted, student


def _config(length: int, batch: int) -> HintedDecodingConfig:
    # Greedy: this random model then repeats a token and never writes eos, so rows run the full length.
    return HintedDecodingConfig(temperature=0.0, max_new_tokens=length, batch_size=batch, repeat_count=10**9)


def bench_guard(tok) -> list[dict]:
    """The guard check alone, per token, at each length: tail watch vs whole-text decode."""
    rows = []
    ids = tok("The numbers add up: 12 + 30 = 42, and so on. " * 400)["input_ids"]
    for length in LENGTHS:
        watch = TailWatch(tok, ANSWER_MARKERS)
        for t in ids[: length - 64]:
            watch.push(t)
        start = time.perf_counter()
        for t in ids[length - 64 : length]:
            watch.push(t)
        tail = (time.perf_counter() - start) / 64
        start = time.perf_counter()
        for k in range(length - 64, length):
            text_contains(tok, ids[: k + 1], ANSWER_MARKERS)
        whole = (time.perf_counter() - start) / 64
        rows.append({"new_tokens": length, "tail_ms": 1e3 * tail, "whole_text_ms": 1e3 * whole})
    return rows


def _timed(owner, name: str, spent: dict) -> None:
    """Replace owner.name by a wrapper that adds its seconds to spent["s"]."""
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        spent["s"] += time.perf_counter() - start
        return out

    setattr(owner, name, timed)


def _with_control(owner, name: str, spent: dict) -> None:
    """Before every call of owner.name, time the same call on fixed random logits of the same shape
    (spent["s"]): work that cannot grow with the length, run in the state the forward pass left the
    machine in, so a slowdown it shows comes from that state (caches, memory), not from our code."""
    inner, fixed = getattr(owner, name), {}

    def controlled(hinted_logits, student_logits, **kwargs):
        shape = tuple(hinted_logits.shape)
        if shape not in fixed:
            g = torch.Generator().manual_seed(len(fixed))
            fixed[shape] = (torch.randn(shape, generator=g), torch.randn(shape, generator=g))
        start = time.perf_counter()
        inner(*fixed[shape], **kwargs)  # a draw carries no state: the extra call changes nothing
        spent["s"] += time.perf_counter() - start
        return inner(hinted_logits, student_logits, **kwargs)

    setattr(owner, name, controlled)


def bench_book(tok, batch: int, repeats: int = 3) -> list[dict]:
    """The pair mixer alone (decoding.pairs.PairBook, as vLLM runs it) on random logits, no model:
    ms per step at each length, so that nothing but our own per-step work is timed. The least of
    `repeats` runs, since other jobs on a shared machine only ever add time."""
    runs = [_book_run(tok, batch) for _ in range(repeats)]
    return [{"new_tokens": length, "book_ms_per_step": min(run[i] for run in runs)} for i, length in enumerate(LENGTHS)]


def _book_run(tok, batch: int) -> list[float]:
    cfg = HintedDecodingConfig(temperature=0.3, top_p=0.95, max_new_tokens=max(LENGTHS), repeat_count=10**9)
    book, outs, added = PairBook(lambda: tok), [], []
    for i in range(batch):
        for role in ("hinted", "student"):
            outs.append([])
            spec = pair_spec(f"p{i}", role, seed=i, config=cfg, markers=ANSWER_MARKERS, eos=tok.eos_token_id)
            added.append((len(added), spec, outs[-1]))
    book.update([], added, [])
    g = torch.Generator().manual_seed(0)
    bank = [torch.randn(2 * batch, len(tok), generator=g) for _ in range(16)]

    def step(k: int) -> None:
        tokens = book.apply(bank[k % len(bank)].clone()).argmax(-1).tolist()
        for out, token in zip(outs, tokens):
            out.append(token)

    rows, done = [], 0
    for length in LENGTHS:
        while done < length - 256:
            step(done)
            done += 1
        start = time.perf_counter()
        for _ in range(256):
            step(done)
            done += 1
        rows.append(1e3 * (time.perf_counter() - start) / 256)
    return rows


def bench_hf_length(batch: int) -> list[dict]:
    model, tok = _tiny(max(LENGTHS) + 64)
    clock = ForwardClock(model)
    hinted, student = _pairs(tok, batch)
    # Our own per-step work, timed directly: the mixing and draw, the answer guard, the repetition stop.
    ours, control = {"s": 0.0}, {"s": 0.0}
    _with_control(hf, "hinted_step", control)
    _timed(hf, "hinted_step", ours)
    _timed(TailWatch, "push", ours)
    _timed(RepetitionStop, "push", ours)
    rows = []
    for length in LENGTHS:
        clock.total, ours["s"], control["s"] = 0.0, 0.0, 0.0
        start = time.perf_counter()
        out = hf_two_stream(model, hinted, student, _config(length, batch), tok)
        total = time.perf_counter() - start - control["s"]
        steps = max(len(o) for o in out)  # a row may still end at the tokenizer's eos
        rows.append({"backend": "hf", "batch": batch, "new_tokens": length, "tokens_per_pair": steps,
                     "ms_per_step": 1e3 * total / steps, "forward_ms_per_step": 1e3 * clock.total / steps,
                     "other_ms_per_step": 1e3 * (total - clock.total) / steps,
                     "mixing_and_rules_ms_per_step": 1e3 * (ours["s"] - control["s"]) / steps,
                     "control_ms_per_step": 1e3 * control["s"] / steps})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _timed_book():
    """Accumulate the seconds the engine spends inside the pair mixer (in-process engine only)."""
    spent = {"s": 0.0}
    apply = PairBook.apply

    def timed(self, logits):
        start = time.perf_counter()
        out = apply(self, logits)
        spent["s"] += time.perf_counter() - start
        return out

    PairBook.apply = timed
    return spent


def bench_vllm_length(batch: int) -> list[dict]:
    model, tok = _tiny(max(LENGTHS) + 64)
    spent = _timed_book()
    backend = make_backend("vllm", model, tok, max_model_len=max(LENGTHS) + 64)
    hinted, student = _pairs(tok, batch)
    rows = []
    for length in LENGTHS:
        spent["s"] = 0.0
        start = time.perf_counter()
        out = backend.two_stream(hinted, student, _config(length, batch), tok)
        total = time.perf_counter() - start
        steps = max(len(o) for o in out)
        rows.append({"backend": "vllm", "batch": batch, "new_tokens": length, "tokens_per_pair": steps,
                     "ms_per_step": 1e3 * total / steps, "mixer_ms_per_step": 1e3 * spent["s"] / steps,
                     "engine_ms_per_step": 1e3 * (total - spent["s"]) / steps})
        print(json.dumps(rows[-1]), flush=True)
    backend.close()
    return rows


def bench_vllm_throughput(model_name: str, sizes: list[int], length: int) -> dict:
    tok = load_tokenizer(model_name)
    rows_data = arithmetic_splits(n_train=max(sizes))["train"]
    hinted = [hinted_prompt_ids(tok, HintTemplate(), r["prompt"], r["response"]) for r in rows_data]
    student = [student_prompt_ids(tok, r["prompt"]) for r in rows_data]
    spent = _timed_book()
    backend = make_backend("vllm", resolve_model_path(model_name), tok, max_model_len=1024, max_num_seqs=2 * max(sizes))
    # The engine's first call builds what it keeps for later ones (the answer guard's token table,
    # the first batches' kernels): timed on its own, so that the rows below are steady state.
    start = time.perf_counter()
    backend.two_stream(hinted[:1], student[:1], HintedDecodingConfig(temperature=0.3, max_new_tokens=8), tok)
    backend.sample(student[:1], SamplingConfig(temperature=0.3, max_new_tokens=8))
    first_call_s = time.perf_counter() - start
    rows = []
    for b in sizes:
        hd = HintedDecodingConfig(temperature=0.3, max_new_tokens=length, batch_size=b)
        sc = SamplingConfig(temperature=0.3, max_new_tokens=length)
        spent["s"] = 0.0
        start = time.perf_counter()
        two = backend.two_stream(hinted[:b], student[:b], hd, tok)
        t_two = time.perf_counter() - start
        mixer = spent["s"]
        start = time.perf_counter()
        one = backend.sample(student[:b], sc)
        t_one = time.perf_counter() - start
        n_two, n_one = sum(map(len, two)), sum(len(c[0]) for c in one)
        rows.append({"batch": b, "max_new_tokens": length, "two_stream_tokens": n_two, "two_stream_s": t_two,
                     "sample_tokens": n_one, "sample_s": t_one,
                     "two_stream_tokens_per_s": n_two / t_two, "sample_tokens_per_s": n_one / t_one,
                     "ratio": (n_two / t_two) / (n_one / t_one), "mixer_share_of_two_stream": mixer / t_two})
        print(json.dumps(rows[-1]), flush=True)
    backend.close()
    return {"model": model_name, "first_call_s": first_call_s, "rows": rows}


def profile_step(sizes: list[int], vocab: int = 49152) -> list[dict]:
    """Where one mixer step's time goes, per part of decoding.mixing.hinted_step, on logits shaped
    like a language model's (a few likely tokens over a long tail), vocabulary of SmolLM2."""
    rows = []
    for b in sizes:
        g = torch.Generator().manual_seed(b)
        hinted = torch.randn(b, vocab, generator=g) * 2
        student = torch.randn(b, vocab, generator=g) * 2
        hinted[:, :20] += 12
        student[:, 10:30] += 12
        u = torch.from_numpy(uniforms(stream_keys(range(b)), 0))
        mixed, _ = mix_logprobs(hinted, student, 3.0)
        nucleus = top_p_mask(mixed, 0.95)
        parts = {"mix_logprobs": lambda: mix_logprobs(hinted, student, 3.0),
                 "top_p_mask": lambda: top_p_mask(mixed, 0.95),
                 "draw": lambda: draw(nucleus, 0.3, u),
                 "hinted_step": lambda: hinted_step(hinted, student, beta=3.0, top_p=0.95, temperature=0.3, u=u)}
        row = {"pairs": b, "vocab": vocab}
        for name, fn in parts.items():
            fn()
            start = time.perf_counter()
            for _ in range(5):
                fn()
            row[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / 5
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _child(part: str, args, **env) -> object:
    cmd = [sys.executable, __file__, "--child", part, "--batch", str(args.batch), "--model", args.model,
           "--new-tokens", str(args.new_tokens), "--sizes", *map(str, args.sizes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(found[-1]) if found else f"failed: {proc.stderr[-2000:]}"


def write_md(result: dict, path: Path) -> None:
    lines = ["# Hinted Decoding at real lengths and batch sizes", "",
             f"{result['device']} (2 shared cores), torch threads {result['threads']}.", ""]
    if "length" in result:
        lines += ["## Cost per decode step against response length (tiny random model, batch "
                  f"{result['batch']} pairs)", "", f"Command: `{result['length'].get('command', result['command'])}`"
                  + (f"; vLLM rows: `{result['length']['vllm_command']}`"
                     if result["length"].get("vllm_command", result["length"].get("command")) != result["length"].get("command")
                     else ""), "",
                  "hf: forward = time inside the model's forward pass; other = everything else (mixing, guard, "
                  "stop rules, bookkeeping). vLLM: mixer = time inside the pair mixer; engine = the rest "
                  "(forward pass, scheduler, sampler).", "",
                  "hf, mixing and rules: the time inside hinted_step, the answer guard and the repetition stop "
                  "alone (part of other). Control: before every step, the same hinted_step on fixed random "
                  "logits of the same shape (work that cannot grow with the length), timed apart and left out "
                  "of the other columns.", "",
                  "| backend | new tokens | ms / step | forward or engine ms | other or mixer ms | mixing and rules ms "
                  "| control ms |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["length"]["hf"]:
            ours, control = r.get("mixing_and_rules_ms_per_step"), r.get("control_ms_per_step")
            lines.append(f"| hf | {r['new_tokens']} | {r['ms_per_step']:.2f} | {r['forward_ms_per_step']:.2f} "
                         f"| {r['other_ms_per_step']:.2f} | {'-' if ours is None else f'{ours:.2f}'} "
                         f"| {'-' if control is None else f'{control:.2f}'} |")
        v = result["length"]["vllm"]
        if isinstance(v, list):
            for r in v:
                lines.append(f"| vllm | {r['new_tokens']} | {r['ms_per_step']:.2f} | {r['engine_ms_per_step']:.2f} "
                             f"| {r['mixer_ms_per_step']:.2f} | | |")
        else:
            lines.append(f"| vllm | {v} | | | | | |")
        for key, label in (("hf", "other_ms_per_step"), ("hf", "mixing_and_rules_ms_per_step"),
                           ("hf", "control_ms_per_step"), ("vllm", "mixer_ms_per_step")):
            rows = result["length"][key]
            if isinstance(rows, list) and label in rows[0]:
                lines.append(f"\n{key}: {label.removesuffix('_ms_per_step')} at {LENGTHS[-1]} / at {LENGTHS[0]} "
                             f"tokens = {rows[-1][label] / rows[0][label]:.2f}x")
        if "book" in result["length"]:
            lines += ["", "The pair mixer alone (decoding.pairs.PairBook as vLLM drives it; random logits, no model), "
                      "ms per step over 256 steps ending at each length, least of 3 runs"
                      + (f" (`{result['length']['book_command']}`)" if "book_command" in result["length"] else "")
                      + ":", "", "| new tokens | mixer ms / step |",
                      "|---|---|"]
            lines += [f"| {r['new_tokens']} | {r['book_ms_per_step']:.3f} |" for r in result["length"]["book"]]
        lines += ["", "Answer-guard check alone, per token per pair:", "",
                  "| new tokens | tail watch ms | whole-text decode ms |", "|---|---|---|"]
        for r in result["length"]["guard"]:
            lines.append(f"| {r['new_tokens']} | {r['tail_ms']:.4f} | {r['whole_text_ms']:.4f} |")
    for key, note in (("throughput", ""), ("throughput_earlier", ", an earlier run with top_p_mask sorting the whole vocabulary")):
        if key not in result:
            continue
        t = result[key]
        lines += ["", f"## vLLM two-stream against plain sampling ({t.get('model') if isinstance(t, dict) else ''}{note})", ""]
        if isinstance(t, dict):
            lines += [f"Command: `{t.get('command', result['command'])}`, {t['rows'][0]['max_new_tokens']} new tokens "
                      "at most per row, temperature 0.3.", "",
                      "| pairs | two-stream tok/s per pair-stream | plain sampling tok/s | ratio | mixer share of two-stream time |",
                      "|---|---|---|---|---|"]
            for r in t["rows"]:
                lines.append(f"| {r['batch']} | {r['two_stream_tokens_per_s']:.1f} | {r['sample_tokens_per_s']:.1f} "
                             f"| {r['ratio']:.2f} | {r['mixer_share_of_two_stream']:.1%} |")
        else:
            lines.append(str(t))
    if "profile" in result:
        p = result["profile"]
        lines += ["", f"## One mixer step, by part (`{p['command']}`, {p['threads']} threads)", "",
                  "Random logits shaped like a language model's, SmolLM2's vocabulary; ms per step for all pairs.", "",
                  "| pairs | mix_logprobs | top_p_mask | draw | whole hinted_step |", "|---|---|---|---|---|"]
        for r in p["rows"]:
            lines.append(f"| {r['pairs']} | {r['mix_logprobs_ms']:.1f} | {r['top_p_mask_ms']:.1f} | {r['draw_ms']:.1f} "
                         f"| {r['hinted_step_ms']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["length", "hf-length", "throughput", "profile", "all"], default="all",
                        help="hf-length: the length part without vLLM (its earlier vLLM rows are kept)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per run in the length part")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=128, help="per row in the throughput part")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # A tiny model runs fastest on one thread (two spin against each other on a shared machine).
    torch.set_num_threads(1 if args.child != "throughput" else min(2, torch.get_num_threads()))
    if args.child == "vllm_length":
        print("RESULT " + json.dumps(bench_vllm_length(args.batch)))
        return
    if args.child == "throughput":
        print("RESULT " + json.dumps(bench_vllm_throughput(args.model, args.sizes, args.new_tokens)))
        return
    result = {"device": "cuda" if torch.cuda.is_available() else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "batch": args.batch, "command": "python " + " ".join(sys.argv)}
    name = "decoding_length_bench"
    if args.out.joinpath(f"{name}.json").exists():
        result = {**json.loads(args.out.joinpath(f"{name}.json").read_text()), **result}
    if args.part in ("length", "hf-length", "all"):
        _, tok = _tiny(64)
        earlier = result.get("length", {})
        vllm = earlier.get("vllm", "not run") if args.part == "hf-length" else \
            _child("vllm_length", args, VLLM_CPU_OMP_THREADS_BIND="0")
        result["length"] = {"guard": bench_guard(tok), "book": bench_book(tok, args.batch),
                            "hf": bench_hf_length(args.batch), "vllm": vllm, "command": result["command"],
                            "vllm_command": earlier.get("command") if args.part == "hf-length" else result["command"]}
    if args.part in ("profile", "all"):
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        result["profile"] = {"rows": profile_step(args.sizes), "command": result["command"],
                             "threads": torch.get_num_threads()}
    if args.part in ("throughput", "all"):
        result["throughput"] = _child("throughput", args)
        if isinstance(result["throughput"], dict):
            result["throughput"]["command"] = result["command"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_md(result, args.out / f"{name}.md")
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
