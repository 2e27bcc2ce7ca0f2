"""``onpolicy-sft``: one subcommand per stage, each a thin layer over a public function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onpolicy_sft.models import EMBEDDED_MODEL


def add_model(sub) -> None:
    p = sub.add_parser("model", help="fetch, convert or inspect a model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("action", choices=["fetch", "info", "ask"], help="fetch: download and convert; info: shapes; ask: answer a question")
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--question", default="What is 12 + 30? Put the final answer in \\boxed{}.")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(run=run_model)


def run_model(args) -> int:
    from onpolicy_sft import models

    if args.action == "fetch":
        print(models.resolve_model_path(args.model))
        return 0
    model, tokenizer = models.load_model(args.model)
    if args.action == "info":
        info = {
            "path": models.resolve_model_path(args.model),
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": model.config.vocab_size,
            "layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "dtype": str(next(model.parameters()).dtype),
            "device": str(next(model.parameters()).device),
        }
        print(json.dumps(info, indent=2))
        return 0
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    out = model.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def add_data(sub) -> None:
    p = sub.add_parser("data", help="inspect (show) or convert a dataset; default: the embedded arithmetic dataset")
    p.add_argument("action", choices=["show", "convert"], help="show: preview rows and token statistics; "
                   "convert: write the normalised dataset (--out .jsonl or .parquet)")
    p.add_argument("source", nargs="?", default="arithmetic",
                   help="'arithmetic' (embedded), a .jsonl/.json/.parquet/.csv file, a saved dataset dir or a hub name")
    p.add_argument("--split", default=None, help="split (default: test for arithmetic, train otherwise)")
    p.add_argument("--columns", action="append", default=[], metavar="OURS=THEIRS",
                   help="column mapping, e.g. --columns prompt=instruction --columns response=output")
    p.add_argument("--preferences", action="store_true", help="load {prompt, chosen, rejected} pairs")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad rows: stop, or skip and count")
    p.add_argument("--seed", type=int, default=0, help="arithmetic: generator seed")
    p.add_argument("--n", type=int, default=200, help="arithmetic: rows per split")
    p.add_argument("--rows", type=int, default=3, help="show: rows to preview")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="show: tokenizer for the token statistics")
    p.add_argument("--max-length", type=int, default=1024, help="show: count rows longer than this")
    p.add_argument("--out", help="convert: output file (.jsonl or .parquet)")
    p.set_defaults(run=run_data)


def run_data(args) -> int:
    from onpolicy_sft import data

    if args.source == "arithmetic":
        from onpolicy_sft.arith import arithmetic_splits

        dataset = arithmetic_splits(seed=args.seed, n_train=args.n, n_test=args.n, n_test_hard=args.n)[args.split or "test"]
        report = None
    else:
        columns = dict(c.split("=", 1) for c in args.columns)
        read = data.read_preferences if args.preferences else data.read_demonstrations
        try:
            dataset, report = read(args.source, split=args.split or "train", columns=columns or None,
                                   on_error=args.on_error)
        except data.DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if report is not None and report.n_skipped:
        print(f"skipped {report.n_skipped} rows: {dict(report.skipped)}", file=sys.stderr)
        for message in report.messages:
            print(f"  {message}", file=sys.stderr)
    if args.action == "convert":
        if not args.out:
            print("error: convert needs --out FILE.jsonl|FILE.parquet", file=sys.stderr)
            return 2
        print(f"wrote {len(dataset)} rows to {data.save_dataset(dataset, args.out)}")
        return 0
    for row in dataset.select(range(min(args.rows, len(dataset)))):
        print(json.dumps(row, ensure_ascii=False, indent=2))
    if "response" in dataset.column_names:
        from onpolicy_sft.models import load_tokenizer

        stats = data.token_statistics(dataset, load_tokenizer(args.model), max_length=args.max_length)
        print(json.dumps({"tokenizer": args.model, **stats}, indent=2))
    else:
        print(json.dumps({"rows": len(dataset)}))
    return 0


def _add_config_args(p) -> None:
    p.add_argument("--config", help="YAML loop config (experiments/configs/*.yaml); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-5 (repeatable)")


def _load_config(args):
    from onpolicy_sft.config import load_config

    return load_config(args.config, args.overrides)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with any objective (the config's model, data and train sections)")
    _add_config_args(p)
    p.add_argument("--data", help="demonstrations to train on (path or hub name), or {prompt, chosen, rejected} pairs "
                                   "for dpo/simpo; default: the config's data.source/train_split")
    p.add_argument("--objective", help="objective name (sft, idft, dpo, simpo, ...); replaces train.objective and its "
                                        "hyperparameters unless it names the same objective")
    p.add_argument("--out", required=True, help="checkpoint directory (save_pretrained format); rerun to resume")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    from onpolicy_sft.config import ObjectiveConfig
    from onpolicy_sft.loop import load_data
    from onpolicy_sft.models import load_model
    from onpolicy_sft.objectives import build
    from onpolicy_sft.train import has_cached_ref_logps, train

    config = _load_config(args)
    if args.objective and args.objective != config.train.objective.name:
        config.train.objective = ObjectiveConfig(name=args.objective)
    objective = build(config.train.objective.name, **config.train.objective.hparams)
    if objective.pairwise:
        if not args.data:
            raise ValueError(f"objective {objective.name!r} trains on preference pairs: pass --data with "
                             "{prompt, chosen, rejected} rows")
        from onpolicy_sft.data import load_preferences

        dataset = load_preferences(args.data)
    elif args.data:
        from onpolicy_sft.data import load_demonstrations

        dataset = load_demonstrations(args.data)
    else:
        dataset = load_data(config)[0]
    model, tokenizer = load_model(config.model.name, dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code)
    if "ref_logps" in objective.needs and not has_cached_ref_logps(dataset):
        from onpolicy_sft.preference import cached_reference_logps

        # The reference is the starting model unless the config names another.
        ref = model if config.train.ref in (None, "base") else load_model(config.train.ref, dtype=config.model.dtype)[0]
        dataset = cached_reference_logps(ref, tokenizer, dataset, Path(args.out) / "reference_logps",
                                         max_length=config.train.max_length)
        del ref
    print(train(model, tokenizer, dataset, config.train, out_dir=args.out, objective=objective))
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate accuracy (greedy, avg@k, pass@k) and forgetting of a model")
    _add_config_args(p)
    p.add_argument("--model", help="model to evaluate (checkpoint dir or name); default: the config's model")
    p.add_argument("--base", help="base model for forgetting (KL(base || model)); skipped when omitted")
    p.add_argument("--out", help="write per-example results and metrics.json here")
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    from pathlib import Path

    from onpolicy_sft.evaluate import evaluate, forgetting
    from onpolicy_sft.loop import load_data
    from onpolicy_sft.models import load_model

    config = _load_config(args)
    model, tokenizer = load_model(args.model or config.model.name, dtype=config.model.dtype)
    _, eval_sets, general = load_data(config)
    out = Path(args.out) if args.out else None
    metrics = {s: evaluate(model, tokenizer, d, config.eval, out_dir=out / s if out else None) for s, d in eval_sets.items()}
    if args.base:
        base, _ = load_model(args.base, dtype=config.model.dtype)
        metrics["forgetting"] = forgetting(base, model, tokenizer, general, max_new_tokens=config.eval.forgetting_max_new_tokens)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return 0


def add_loop(sub) -> None:
    p = sub.add_parser("loop", help="run (or resume) the rewrite -> score -> train -> evaluate loop")
    _add_config_args(p)
    p.set_defaults(run=run_loop)


def run_loop(args) -> int:
    import logging

    from onpolicy_sft.loop import run_loop as loop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = loop(_load_config(args))
    if summary.get("backend_note"):
        print(summary["backend_note"])
    print(summary["table"])
    print(f"\nsummary, plots and per-round artefacts: {summary['out_dir']}")
    return 0


def add_score(sub) -> None:
    p = sub.add_parser("score", help="DDT-score a corpus under a model: scored data, report.md and plots")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="checkpoint dir, hub id, or the embedded default")
    p.add_argument("--data", required=True, help="demonstrations (path or hub name); 'arithmetic' = the built-in set")
    p.add_argument("--split", default="train")
    p.add_argument("--compare", help="a second corpus (same forms as --data) scored and reported beside the first")
    p.add_argument("--out", required=True, help="directory for scored_*.parquet, summary.json, report.md, PNGs")
    p.add_argument("--limit", type=int, help="score only the first N rows of each corpus")
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per batch")
    p.add_argument("--per-token", action="store_true", help="also store each row's per-token φ (ddt_phi)")
    p.add_argument("--dtype", help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.set_defaults(run=run_score)


def _demonstrations(source: str, split: str, limit: int | None):
    """The built-in arithmetic split, or demonstrations loaded from a file or hub name; the first `limit` rows."""
    if source == "arithmetic":
        from onpolicy_sft.arith import arithmetic_splits

        dataset = arithmetic_splits()[split]
    else:
        from onpolicy_sft.data import load_demonstrations

        dataset = load_demonstrations(source, split=split)
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


def run_score(args) -> int:
    from pathlib import Path

    from onpolicy_sft import ddt, ddt_report
    from onpolicy_sft.models import load_model

    state = ddt.process_state()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=state.device)
    sources = {f"{Path(args.data).name}/{args.split}": (args.data, "scored.parquet")}
    if args.compare:
        name = f"{Path(args.compare).name}/{args.split}"
        sources[name if name not in sources else f"{name} (compare)"] = (args.compare, "scored_compare.parquet")
    options = {"per_token": args.per_token}
    if args.batch_tokens:
        options["batch_tokens"] = args.batch_tokens
    corpora = {name: ddt.score(model, tokenizer, _demonstrations(src, args.split, args.limit), **options)
               for name, (src, _) in sources.items()}
    if not state.is_main_process:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, scored in corpora.items():
        scored.to_parquet(str(out / sources[name][1]))
        summary[name] = ddt.summarize(scored)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report = ddt_report.write_report(out, corpora)
    print(ddt_report.summary_table(summary))
    print(f"\nreport: {report}")
    return 0


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare SFT/DFT/Target-SFT/IDFT (original and Hinted-Decoding corpora) "
                                       "with DPO@k/SimPO@k on the same prompts and budget")
    p.add_argument("--config", help="YAML comparison config (experiments/configs/compare_*.yaml); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set seeds=[0] (repeatable)")
    p.set_defaults(run=run_compare)


def run_compare(args) -> int:
    import logging

    from onpolicy_sft.compare import load_compare_config, run_comparison

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = run_comparison(load_compare_config(args.config, args.overrides))
    if summary.get("backend_note"):
        print(summary["backend_note"])
    print(summary["table"])
    for note in summary["notes"]:
        print(f"- {note}")
    print(f"\nresults.md, results.json, compare.png and per-cell artefacts: {summary['out_dir']}")
    return 0


def add_rewrite(sub) -> None:
    p = sub.add_parser("rewrite", help="rewrite a corpus with Hinted Decoding (self-answers, hinted attempts, fallback)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="the model that rewrites and scores (name or checkpoint dir)")
    p.add_argument("--data", required=True, help="'arithmetic' (built-in train split) or a demonstrations file/hub name")
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="output directory (shards, stats.json, rewritten.jsonl); rerun to resume")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--limit", type=int, help="rewrite only the first N rows")
    p.add_argument("--k-self", type=int, default=4, help="self-answers per question")
    p.add_argument("--m-hinted", type=int, default=4, help="hinted attempts per question")
    p.add_argument("--beta", type=float, default=3.0, help="entropy weight of the student stream")
    p.add_argument("--temperature", type=float, default=0.3, help="hinted decoding temperature")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--fallback", choices=["original", "drop"], default="original")
    p.add_argument("--analysis", action="store_true", help="stage-1 analysis prefix in the hinted stream")
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_rewrite)


def run_rewrite(args) -> int:
    from decoding import HintedDecodingConfig, SamplingConfig, make_backend
    from decoding.rewrite import RewriteConfig, rewrite_with_stats
    from onpolicy_sft.models import load_model, resolve_model_path

    dataset = _demonstrations(args.data, args.split, args.limit)
    config = RewriteConfig(
        k_self=args.k_self, m_hinted=args.m_hinted, fallback=args.fallback, analysis=args.analysis,
        shard_size=args.shard_size, seed=args.seed, model_name=args.model,
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens),
        hinted=HintedDecodingConfig(beta=args.beta, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                    backend=args.backend),
    )
    model, tokenizer = load_model(args.model)
    # vLLM serves the checkpoint from disk; the transformers model stays for DDT scoring.
    source = resolve_model_path(args.model) if args.backend == "vllm" else model
    with make_backend(args.backend, source, tokenizer) as backend:
        _, stats = rewrite_with_stats(model, tokenizer, dataset, config, out_dir=args.out, backend=backend)
    print(json.dumps(stats, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onpolicy-sft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_model(sub)
    add_data(sub)
    add_score(sub)
    add_rewrite(sub)
    add_train(sub)
    add_eval(sub)
    add_loop(sub)
    add_compare(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
