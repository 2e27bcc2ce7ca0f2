"""Evaluation: greedy accuracy, avg@k and unbiased pass@k, and forgetting (docs/methods.md §6).

Generation goes through a decoding backend (hf or vllm), so evaluation decodes exactly as the
rewrite stage does. Standard errors are over examples (or over prompts for forgetting): the
spread a reader needs to judge a difference between two rounds.

Under ``torchrun`` / ``accelerate launch`` with N processes every function here splits its rows
across the processes (onpolicy_sft.run), each process generating and checking its share
with its own backend; the results are gathered in input order, so every process returns what one
process would. Sampling streams are seeded by row (the stream of row i's sample j is the one a
single process gives it), so the split does not change any sample.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from decoding import make_backend
from decoding.mixing import stream_seeds
from decoding.sampling import SamplingConfig
from onpolicy_sft.config import EvalConfig
from onpolicy_sft.encoding import collate, encode_prompt, encode_row_prompt
from onpolicy_sft.grading import is_correct
from onpolicy_sft.models import decoder_hidden_states, lm_head_weight
from onpolicy_sft.ops import IGNORE_INDEX, Source, softmax_chunks
from onpolicy_sft.run import RunDir, is_main, map_shards, map_shares
from onpolicy_sft.rundir import read_json, write_json

logger = logging.getLogger(__name__)


def row_seeds(seed: int, rows: list[int], total: int, n: int) -> list[int]:
    """The first stream seed of each of ``rows`` (indices into all ``total`` prompts), ``n`` samples a
    row: the streams one call over all the prompts would use, whichever process samples the row."""
    streams = stream_seeds(seed, total, per_row=n)
    return [streams[i * n] for i in rows]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k)/C(n, k) (Chen et al., 2021).

    Computed as a product of ratios, 1 − Π_{i=n−c+1}^{n} (1 − k/i), which never forms the
    huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / √n; 0 for fewer than two values)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _prompt_ids(tokenizer, dataset) -> list[list[int]]:
    return [encode_row_prompt(tokenizer, row) for row in dataset]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _generate(backend, prompts: list[list[int]], rows: list[int], total: int, config: EvalConfig):
    """(greedy completion, sampled completions or None) of each prompt, the prompts of ``rows`` of ``total``."""
    if not rows:
        return [], []
    greedy = backend.sample(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=config.max_new_tokens))
    if config.n_samples <= 0:
        return greedy, [None] * len(rows)
    sampling = SamplingConfig(n=config.n_samples, temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.max_new_tokens, seed=config.seed)
    return greedy, backend.sample(prompts, sampling, seeds=row_seeds(config.seed, rows, total, config.n_samples))


def _graded(model, tokenizer, dataset, rows: list[int], config: EvalConfig, backend) -> list[dict]:
    """The per-example record of each of ``rows``: its greedy answer graded, and how many samples are right."""
    prompts = _prompt_ids(tokenizer, dataset.select(rows))
    with nullcontext(backend) if backend is not None else make_backend("hf", model, tokenizer) as serving:
        greedy, samples = _generate(serving, prompts, rows, len(dataset), config)
    answers, questions = dataset["answer"], dataset["prompt"]
    ids = dataset["id"] if "id" in dataset.column_names else [str(i) for i in range(len(dataset))]
    records = []
    for i, completion, sampled in zip(rows, greedy, samples):
        text = _decode(tokenizer, completion[0])
        record = {"id": ids[i], "prompt": questions[i], "answer": answers[i], "response": text,
                  "correct": bool(is_correct(text, answers[i])), "response_tokens": len(completion[0])}
        if sampled is not None:
            record["samples_correct"] = sum(bool(is_correct(_decode(tokenizer, s), answers[i])) for s in sampled)
            record["n_samples"] = len(sampled)
        records.append(record)
    return records


def evaluate(model, tokenizer, dataset, config: EvalConfig, *, backend=None, out_dir: str | Path | None = None) -> dict:
    """Accuracy of ``model`` on ``dataset`` (columns prompt, answer, optional system and id).

    Metrics: ``accuracy`` (greedy) and, with ``config.n_samples`` = n > 0, ``avg@n`` (mean
    accuracy of n samples at config.temperature) and ``pass@k`` for each k in config.pass_k
    (k ≤ n), each with ``<name>_se``; ``processes`` and ``rows_per_process`` say how the rows
    were shared. ``backend`` must already serve ``model``'s weights (in this process); without
    one, an hf backend is made for this call. With ``out_dir`` (locked for the call), per-example
    results go to results.jsonl and the metrics to metrics.json there (by the main process).
    """
    missing = {"prompt", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"evaluate needs columns prompt and answer; the dataset lacks {sorted(missing)}")
    if len(dataset) == 0:
        raise ValueError("evaluate got an empty dataset")
    with RunDir(out_dir, "evaluation") as run:
        mapped = map_shares(lambda rows: _graded(model, tokenizer, dataset, rows, config, backend), len(dataset),
                            "evaluation")
        records = mapped.results
        metrics: dict = {"n_examples": len(records)}
        metrics["accuracy"], metrics["accuracy_se"] = mean_and_se([float(r["correct"]) for r in records])
        metrics["mean_response_tokens"] = sum(r["response_tokens"] for r in records) / len(records)
        if config.n_samples > 0:
            name = f"avg@{config.n_samples}"
            metrics[name], metrics[f"{name}_se"] = mean_and_se([r["samples_correct"] / r["n_samples"] for r in records])
            for k in config.pass_k:
                if k <= config.n_samples:
                    values = [pass_at_k(r["n_samples"], r["samples_correct"], k) for r in records]
                    metrics[f"pass@{k}"], metrics[f"pass@{k}_se"] = mean_and_se(values)
        metrics.update(mapped.record())
        run.write_jsonl("results.jsonl", records)
        run.write_json("metrics.json", metrics)
    return metrics


def base_responses(base_model, tokenizer, prompts: list[str], *, max_new_tokens: int = 96, backend=None) -> list[list[int]]:
    """The base model's own greedy answers (token ids) to ``prompts``: the text forgetting is measured on.

    Split across launched processes like ``evaluate``; every process returns all the answers.
    """

    def answer(rows: list[int]) -> list[list[int]]:
        ids = [encode_prompt(tokenizer, prompts[i]) for i in rows]
        with nullcontext(backend) if backend is not None else make_backend("hf", base_model, tokenizer) as serving:
            out = serving.sample(ids, SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
        return [completions[0] for completions in out]

    return map_shares(answer, len(prompts), "base responses").results


@torch.no_grad()
def _response_softmax(model, batch, positions, chunk_tokens):
    """(rows, ``ops.Softmax``) at the selected positions, ``chunk_tokens`` positions at a time."""
    hidden = decoder_hidden_states(model, batch["input_ids"], batch["attention_mask"])[positions]
    return softmax_chunks(Source(hidden=hidden, weight=lm_head_weight(model)), chunk_tokens=chunk_tokens)


@torch.no_grad()
def _batch_kl(base_model, tuned_model, tokenizer, prompts, responses, chunk_tokens) -> list[tuple[float, int]]:
    """(Σ_t KL_t, number of tokens) of each prompt's response, one padded batch."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(tuned_model.parameters()).device
    rows = []
    for prompt, response in zip(prompts, responses):
        p = encode_prompt(tokenizer, prompt)
        rows.append({"input_ids": p + list(response), "labels": [IGNORE_INDEX] * len(p) + list(response)})
    batch = {k: v.to(device) for k, v in collate(rows, pad).items()}
    # position t predicts token t+1: the response tokens' predictors are where labels[:, 1:] is set
    positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
    positions[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    kl = torch.empty(int(positions.sum()), dtype=torch.float32, device=device)
    for (chunk, base), (_, tuned) in zip(_response_softmax(base_model, batch, positions, chunk_tokens),
                                         _response_softmax(tuned_model, batch, positions, chunk_tokens)):
        # ops' −inf policy: an entry masked in both models adds 0·(floor − floor) = 0.
        kl[chunk] = torch.linalg.vecdot(base.probs, base.log_probs - tuned.log_probs).float()
    owner = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(positions)[positions]
    return [(float(kl[owner == r].sum()), int((owner == r).sum())) for r in range(len(rows))]


@torch.no_grad()
def forgetting(
    base_model,
    tuned_model,
    tokenizer,
    prompts: list[str],
    *,
    responses: list[list[int]] | None = None,
    max_new_tokens: int = 96,
    backend=None,
    batch_size: int = 8,
    chunk_tokens: int = 512,
) -> dict:
    """Mean per-token KL(base ‖ tuned) on the base model's own answers to ``prompts`` (docs/methods.md §6).

    KL_t = Σ_v p_base(v) (log p_base(v) − log p_tuned(v)) at every response position (full
    vocabulary, temperature 1). ``responses`` are the base answers as token ids (made greedily
    with ``backend`` serving the base model, or HF, when not given); pass them to compare many
    tuned models on the same text. Returns the token mean ``kl``, the mean of per-prompt means
    ``kl_prompt_mean`` with its standard error ``kl_se``, the counts, and how the prompts were
    shared between launched processes: whole batches of ``batch_size`` prompts are dealt
    round-robin, so each batch is computed exactly as one process computes it.
    """
    if not prompts:
        raise ValueError("forgetting needs at least one prompt")
    if responses is None:
        responses = base_responses(base_model, tokenizer, prompts, max_new_tokens=max_new_tokens, backend=backend)
    if len(responses) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    starts = list(range(0, len(prompts), batch_size))
    mapped = map_shards(lambda start: _batch_kl(base_model, tuned_model, tokenizer, prompts[start : start + batch_size],
                                                responses[start : start + batch_size], chunk_tokens),
                        starts, "forgetting", sizes=[len(prompts[s : s + batch_size]) for s in starts])
    per_row = [row for batch in mapped.results for row in batch]
    per_prompt = [total / n for total, n in per_row if n]
    count = sum(n for _, n in per_row)
    prompt_mean, se = mean_and_se(per_prompt)
    return {"kl": sum(total for total, _ in per_row) / max(1, count), "kl_prompt_mean": prompt_mean, "kl_se": se,
            "n_prompts": len(per_prompt), "n_tokens": count, **mapped.record()}



# ---------------------------------------------------------------------------------------------
# A model of a recipe evaluated


def general_responses(path: Path, base, tokenizer, prompts: list[str], *, max_new_tokens: int, backend) -> None:
    """The base model's greedy answers to the general prompts: the text forgetting is measured on."""
    responses = base_responses(base, tokenizer, prompts, max_new_tokens=max_new_tokens, backend=backend)
    if is_main():
        write_json(path, {"prompts": prompts, "responses": responses})


def evaluate_model(model, tokenizer, evals: dict, config: EvalConfig, *, backend, base, general_file: Path,
                   out_dir: Path | None = None, progress: bool = True) -> dict:
    """Accuracy on every evaluation set and forgetting against ``base`` (on its saved general answers);
    with ``out_dir``, every answer and metrics.json are written there (by the main process)."""
    metrics = {}
    main = is_main()
    with tqdm(total=len(evals) + 1, desc="evaluate", unit="set", disable=not (progress and main), leave=False) as bar:
        for name, ds in evals.items():
            bar.set_postfix_str(name)
            metrics[name] = evaluate(model, tokenizer, ds, config, backend=backend,
                                     out_dir=out_dir / name if out_dir else None)
            bar.update()
        bar.set_postfix_str("forgetting")
        saved = read_json(general_file)
        metrics["forgetting"] = forgetting(base, model, tokenizer, saved["prompts"], responses=saved["responses"])
        bar.update()
    if out_dir is not None and main:
        write_json(out_dir / "metrics.json", metrics)
    return metrics
