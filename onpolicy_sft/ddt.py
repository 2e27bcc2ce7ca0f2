"""DDT: how in-distribution each demonstration is under a model (METHODS.md §1).

Zhang et al., "Towards On-Policy SFT: Distribution Discriminant Theory and its Applications
in LLM Training" (arXiv 2602.12222). Per response token φ_t = ℓ_t + H_t, which has mean 0
and variance V_t (the varentropy) when y_t is the model's own temperature-1 sample. Per
sequence: mean φ (the authors' score; below about −0.1 reads as out of distribution), sum φ,
Z = Σφ_t / sqrt(ΣV_t) (≈ N(0, 1) for the model's own samples, since the φ_t form a
martingale-difference sequence), the one-sided p-value Φ(Z), and tail fractions.

Scoring runs the decoder body once and the lm_head only on response positions, chunk by
chunk, so no [B, T, V] tensor exists; statistics are float32 or wider whatever the model dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm

from onpolicy_sft.models import decoder_hidden_states, lm_head_weight
from onpolicy_sft.ops import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, TokenStats, chunked_token_stats, token_stats

__all__ = ["SCORE_KEYS", "TokenStats", "token_stats", "sequence_scores", "score", "summarize"]

SCORE_KEYS = (
    "phi_mean", "phi_sum", "z", "pvalue",
    "frac_below_1", "frac_below_3", "frac_below_5", "frac_positive", "n_tokens",
)
PREFIX = "ddt_"
DEFAULT_BATCH_TOKENS = 8192
REJECT_LEVEL = 0.01


@torch.no_grad()
def sequence_scores(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    per_token: bool = False,
) -> dict[str, torch.Tensor]:
    """DDT scores per row of a batch; ``labels`` UNSHIFTED (−100 on prompt and padding).

    Returns CPU tensors [B]: float32 statistics, float64 ``pvalue`` (far-off text has p-values
    below float32's range), int64 ``n_tokens``. Rows without response tokens get NaN scores.
    With ``per_token`` the dict also holds ``phi``: a list of B float32 tensors.
    """
    device = next(model.parameters()).device
    input_ids, labels = input_ids.to(device), labels.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    batch = input_ids.shape[0]

    hidden = decoder_hidden_states(model, input_ids, attention_mask)[:, :-1]
    targets = labels[:, 1:]
    counted = (targets != IGNORE_INDEX) & attention_mask[:, 1:].bool()
    # Only response positions reach the lm_head: prompt and padding logits are never formed.
    stats = chunked_token_stats(hidden[counted], lm_head_weight(model), targets[counted], chunk_tokens)
    rows = counted.nonzero()[:, 0]

    def per_row(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(batch, dtype=values.dtype, device=values.device).index_add_(0, rows, values)

    phi, varentropy = stats.phi.float(), stats.varentropy.float()
    n = counted.sum(1)
    phi_sum = per_row(phi)
    var_sum = per_row(varentropy)
    nf = n.float()
    empty = n == 0
    nan = torch.full_like(phi_sum, float("nan"))
    # Z's denominator can be 0 only when every token was certain; then φ is 0 or −inf anyway.
    z = torch.where(empty, nan, phi_sum / var_sum.clamp_min(torch.finfo(torch.float32).tiny).sqrt())
    result = {
        "phi_mean": torch.where(empty, nan, phi_sum / nf),
        "phi_sum": phi_sum,
        "z": z,
        "frac_below_1": torch.where(empty, nan, per_row((phi < -1).float()) / nf),
        "frac_below_3": torch.where(empty, nan, per_row((phi < -3).float()) / nf),
        "frac_below_5": torch.where(empty, nan, per_row((phi < -5).float()) / nf),
        "frac_positive": torch.where(empty, nan, per_row((phi > 0).float()) / nf),
        "n_tokens": n,
    }
    result = {k: v.cpu() for k, v in result.items()}
    result["pvalue"] = torch.from_numpy(norm.cdf(result["z"].double().numpy()))
    result = {k: result[k] for k in SCORE_KEYS}
    if per_token:
        result["phi"] = list(phi.cpu().split(n.tolist()))
    return result


def plan_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Row indices grouped by length (longest first), each batch's padded size ≤ batch_tokens.

    Sorting by length keeps padding small; longest first means an out-of-memory batch shows
    up at once rather than at the end. A row longer than batch_tokens gets a batch alone.
    """
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Rows arrive longest first, so a batch's padded width is its first row's length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def process_state():
    """accelerate's view of the launched processes; without a GPU it joins them over gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _encode(tokenizer, dataset, response_column: str, max_length: int | None) -> list[dict]:
    from onpolicy_sft.data import encode_row

    return [encode_row(tokenizer, row, response_column, max_length) for row in dataset]


def score(
    model,
    tokenizer,
    dataset,
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    per_token: bool = False,
    progress: bool = True,
    response_column: str = "response",
    max_length: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
):
    """``dataset`` with the ``ddt_`` columns of each response, scored after its prompt in the
    plain chat template (the student context). Rows keep their input order.

    Launched with several processes (``accelerate launch``, or ``torchrun`` on CPU-only
    machines), batches are dealt round-robin to the processes and the scores gathered back,
    so every process returns the complete dataset.
    ``per_token`` adds ``ddt_phi`` (a list of φ_t per row) for inspection. A boolean column
    ``<response_column>_truncated`` marks responses cut off at a generation limit, scored without
    the end-of-turn token (``data.encode_row``).
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from onpolicy_sft.data import collate

    state = process_state()
    encoded = _encode(tokenizer, dataset, response_column, max_length)
    batches = plan_batches([len(e["input_ids"]) for e in encoded], batch_tokens)
    mine = batches[state.process_index :: state.num_processes]
    bar = tqdm(
        total=sum(len(encoded[i]["input_ids"]) for b in mine for i in b),
        unit="tok", desc="DDT scoring", disable=not (progress and state.is_local_main_process),
    )
    results: list[tuple[int, dict]] = []
    for batch in mine:
        tensors = collate([encoded[i] for i in batch], tokenizer.pad_token_id)
        scores = sequence_scores(model, tensors["input_ids"], tensors["labels"], tensors["attention_mask"],
                                 chunk_tokens=chunk_tokens, per_token=per_token)
        for j, i in enumerate(batch):
            row = {key: scores[key][j].item() for key in SCORE_KEYS}
            if per_token:
                row["phi"] = scores["phi"][j].tolist()
            results.append((i, row))
        bar.update(int(tensors["attention_mask"].sum()))
    bar.close()
    if state.num_processes > 1:
        results = gather_object(results)
    by_index = dict(results)
    if len(by_index) != len(dataset):
        raise RuntimeError(f"DDT scored {len(by_index)} of {len(dataset)} rows; the process group lost some")
    keys = SCORE_KEYS + (("phi",) if per_token else ())
    stale = [c for c in dataset.column_names if c.startswith(PREFIX)]
    out = dataset.remove_columns(stale) if stale else dataset
    for key in keys:
        out = out.add_column(PREFIX + key, [by_index[i][key] for i in range(len(dataset))])
    return out


def summarize(dataset) -> dict:
    """Corpus summary of a scored dataset, as plain numbers.

    ``phi_mean``/``phi_median``: over rows of each row's mean φ (the authors' corpus score);
    ``phi_token_mean`` and the tail fractions pool all response tokens; ``reject_rate_1pct``
    is the share of rows whose p-value rejects "written by this model" at the 1% level.
    Short rows give each row's test little power, so the corpus as a whole is also tested:
    ``corpus_z`` = Σ_i Z_i / sqrt(n) (Stouffer), N(0, 1) when every row is the model's own
    sample (rows are independent), with one-sided p-value ``corpus_pvalue`` = Φ(corpus_z).
    """
    phi_mean = np.asarray(dataset[PREFIX + "phi_mean"], dtype=np.float64)
    n_tokens = np.asarray(dataset[PREFIX + "n_tokens"], dtype=np.float64)
    z = np.asarray(dataset[PREFIX + "z"], dtype=np.float64)
    pvalue = np.asarray(dataset[PREFIX + "pvalue"], dtype=np.float64)
    total = float(n_tokens.sum())
    finite_z = z[np.isfinite(z)]
    corpus_z = float(finite_z.sum() / np.sqrt(len(finite_z))) if len(finite_z) else float("nan")

    def pooled(name: str) -> float:
        values = np.asarray(dataset[PREFIX + name], dtype=np.float64)
        return float(np.nansum(values * n_tokens) / total) if total else float("nan")

    return {
        "n": int(len(phi_mean)),
        "n_tokens": int(total),
        "phi_mean": float(np.nanmean(phi_mean)) if len(phi_mean) else float("nan"),
        "phi_median": float(np.nanmedian(phi_mean)) if len(phi_mean) else float("nan"),
        "phi_token_mean": float(np.nansum(np.asarray(dataset[PREFIX + "phi_sum"], dtype=np.float64)) / total)
        if total else float("nan"),
        "z_mean": float(np.nanmean(z)) if len(z) else float("nan"),
        "frac_below_1": pooled("frac_below_1"),
        "frac_below_3": pooled("frac_below_3"),
        "frac_below_5": pooled("frac_below_5"),
        "frac_positive": pooled("frac_positive"),
        "reject_rate_1pct": float(np.mean(pvalue < REJECT_LEVEL)) if len(pvalue) else float("nan"),
        "corpus_z": corpus_z,
        "corpus_pvalue": float(norm.cdf(corpus_z)),
    }
