"""Evaluation: greedy accuracy, avg@k and unbiased pass@k, and forgetting (METHODS.md §6).

Generation goes through a decoding backend (hf or vllm), so evaluation decodes exactly as the
rewrite stage does. Standard errors are over examples (or over prompts for forgetting): the
spread a reader needs to judge a difference between two rounds.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from onpolicy_sft.config import EvalConfig
from onpolicy_sft.models import decoder_hidden_states, lm_head_weight
from onpolicy_sft.ops import logit_chunks

logger = logging.getLogger(__name__)


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
    from onpolicy_sft.data import encode_prompt

    systems = dataset["system"] if "system" in dataset.column_names else [""] * len(dataset)
    return [encode_prompt(tokenizer, p, s or "") for p, s in zip(dataset["prompt"], systems)]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def evaluate(model, tokenizer, dataset, config: EvalConfig, *, backend=None, out_dir: str | Path | None = None) -> dict:
    """Accuracy of ``model`` on ``dataset`` (columns prompt, answer, optional system and id).

    Metrics: ``accuracy`` (greedy) and, with ``config.n_samples`` = n > 0, ``avg@n`` (mean
    accuracy of n samples at config.temperature) and ``pass@k`` for each k in config.pass_k
    (k ≤ n), each with ``<name>_se``. ``backend`` must already serve ``model``'s weights; without
    one, a ``config.backend`` backend is made for this call. With ``out_dir``, per-example
    results go to results.jsonl and the metrics to metrics.json there.
    """
    from decoding import make_backend
    from decoding.config import SamplingConfig
    from onpolicy_sft.grading import is_correct

    missing = {"prompt", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"evaluate needs columns prompt and answer; the dataset lacks {sorted(missing)}")
    if len(dataset) == 0:
        raise ValueError("evaluate got an empty dataset")
    own_backend = backend is None
    if own_backend:
        backend = make_backend(config.backend, model, tokenizer)
    try:
        prompts = _prompt_ids(tokenizer, dataset)
        greedy = backend.sample(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=config.max_new_tokens))
        samples = None
        if config.n_samples > 0:
            sampling = SamplingConfig(n=config.n_samples, temperature=config.temperature, top_p=config.top_p,
                                      max_new_tokens=config.max_new_tokens, seed=config.seed)
            samples = backend.sample(prompts, sampling)
    finally:
        if own_backend:
            backend.close()

    answers = dataset["answer"]
    ids = dataset["id"] if "id" in dataset.column_names else [str(i) for i in range(len(dataset))]
    records, correct, lengths = [], [], []
    per_k: dict[int, list[float]] = {k: [] for k in config.pass_k if config.n_samples and k <= config.n_samples}
    avg: list[float] = []
    for i, answer in enumerate(answers):
        text = _decode(tokenizer, greedy[i][0])
        ok = bool(is_correct(text, answer))
        correct.append(float(ok))
        lengths.append(len(greedy[i][0]))
        record = {"id": ids[i], "prompt": dataset["prompt"][i], "answer": answer, "response": text, "correct": ok}
        if samples is not None:
            hits = [bool(is_correct(_decode(tokenizer, s), answer)) for s in samples[i]]
            c, n = sum(hits), len(hits)
            avg.append(c / n)
            for k in per_k:
                per_k[k].append(pass_at_k(n, c, k))
            record["samples_correct"] = c
            record["n_samples"] = n
        records.append(record)

    metrics: dict[str, float] = {"n_examples": len(records)}
    metrics["accuracy"], metrics["accuracy_se"] = mean_and_se(correct)
    metrics["mean_response_tokens"] = sum(lengths) / len(lengths)
    if samples is not None:
        name = f"avg@{config.n_samples}"
        metrics[name], metrics[f"{name}_se"] = mean_and_se(avg)
        for k, values in per_k.items():
            metrics[f"pass@{k}"], metrics[f"pass@{k}_se"] = mean_and_se(values)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "results.jsonl", "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def base_responses(base_model, tokenizer, prompts: list[str], *, max_new_tokens: int = 96, backend=None) -> list[list[int]]:
    """The base model's own greedy answers (token ids) to ``prompts``: the text forgetting is measured on."""
    from decoding import make_backend
    from decoding.config import SamplingConfig
    from onpolicy_sft.data import encode_prompt

    own = backend is None
    backend = backend or make_backend("hf", base_model, tokenizer)
    try:
        ids = [encode_prompt(tokenizer, p) for p in prompts]
        out = backend.sample(ids, SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    finally:
        if own:
            backend.close()
    return [rows[0] for rows in out]


@torch.no_grad()
def _response_log_probs(model, batch, positions, chunk_tokens):
    """(rows, full-vocabulary log-probs [n, V]) at the selected positions, a chunk of rows at a time."""
    hidden = decoder_hidden_states(model, batch["input_ids"], batch["attention_mask"])[positions]
    weight = lm_head_weight(model)
    for rows, logits in logit_chunks(hidden, weight, chunk_tokens):
        yield rows, torch.log_softmax(logits.float(), dim=-1)


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
    """Mean per-token KL(base ‖ tuned) on the base model's own answers to ``prompts`` (METHODS.md §6).

    KL_t = Σ_v p_base(v) (log p_base(v) − log p_tuned(v)) at every response position (full
    vocabulary, temperature 1). ``responses`` are the base answers as token ids (made greedily
    with ``backend`` serving the base model, or HF, when not given); pass them to compare many
    tuned models on the same text. Returns the token mean ``kl``, the mean of per-prompt means
    ``kl_prompt_mean`` with its standard error ``kl_se``, and the counts.
    """
    from onpolicy_sft.data import collate, encode_prompt

    if not prompts:
        raise ValueError("forgetting needs at least one prompt")
    if responses is None:
        responses = base_responses(base_model, tokenizer, prompts, max_new_tokens=max_new_tokens, backend=backend)
    if len(responses) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_prompt: list[float] = []
    total, count = 0.0, 0
    device = next(tuned_model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, response in zip(prompts[start : start + batch_size], responses[start : start + batch_size]):
            p = encode_prompt(tokenizer, prompt)
            rows.append({"input_ids": p + list(response), "labels": [-100] * len(p) + list(response)})
        batch = {k: v.to(device) for k, v in collate(rows, pad).items()}
        # position t predicts token t+1: the response tokens' predictors are where labels[:, 1:] is set
        positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
        positions[:, :-1] = batch["labels"][:, 1:] != -100
        kl = torch.empty(int(positions.sum()), dtype=torch.float32, device=device)
        for (rows_b, logp_b), (_, logq_t) in zip(
            _response_log_probs(base_model, batch, positions, chunk_tokens),
            _response_log_probs(tuned_model, batch, positions, chunk_tokens),
        ):
            kl[rows_b] = (logp_b.exp() * (logp_b - logq_t)).sum(-1)
        owner = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(positions)[positions]
        for r in range(len(rows)):
            values = kl[owner == r]
            if values.numel():
                per_prompt.append(float(values.mean()))
        total += float(kl.sum())
        count += kl.numel()
    prompt_mean, se = mean_and_se(per_prompt)
    return {"kl": total / max(1, count), "kl_prompt_mean": prompt_mean, "kl_se": se,
            "n_prompts": len(per_prompt), "n_tokens": count}
