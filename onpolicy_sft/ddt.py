"""DDT: how in-distribution each demonstration is under a model (docs/methods.md §1).

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

import hashlib
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

from onpolicy_sft.encoding import collate, encode_row
from onpolicy_sft.models import decoder_hidden_states, lm_head_weight, weights_digest
from onpolicy_sft.ops import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, TokenStats, chunked_token_stats, token_stats
from onpolicy_sft.run import RunDir, map_shards

__all__ = ["SCORE_KEYS", "TokenStats", "token_stats", "sequence_scores", "score", "off_distribution", "summarize"]

SCORE_KEYS = (
    "phi_mean", "phi_sum", "z", "pvalue",
    "frac_below_1", "frac_below_3", "frac_below_5", "frac_positive", "n_tokens",
)
PREFIX = "ddt_"
CUT_COLUMN = PREFIX + "cut"
CUTS = ("", "truncated", "skipped_overlong", "skipped_prompt_too_long")
ON_LONG = ("truncate", "skip")
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


def _cut_to_length(encoded: dict, max_length: int | None, on_long: str) -> tuple[dict | None, str]:
    """(the row as scored or None when skipped, what was done: CUTS)."""
    if max_length is None or len(encoded["input_ids"]) <= max_length:
        return encoded, ""
    if all(label == IGNORE_INDEX for label in encoded["labels"][:max_length]):
        return None, "skipped_prompt_too_long"  # no response token would be left to score
    if on_long == "skip":
        return None, "skipped_overlong"
    return {"input_ids": encoded["input_ids"][:max_length], "labels": encoded["labels"][:max_length]}, "truncated"


def _encode(tokenizer, dataset, response_column: str, max_length: int | None, on_long: str):
    # One token past the cap is enough to tell a long row from one that fits.
    limit = max_length + 1 if max_length is not None else None
    rows = [_cut_to_length(encode_row(tokenizer, row, response_column, max_length=limit), max_length, on_long)
            for row in dataset]
    return [r for r, _ in rows], [cut for _, cut in rows]


def _data_digest(encoded: list[dict | None], cuts: list[str]) -> str:
    hashed = hashlib.sha256()
    for row, cut in zip(encoded, cuts):
        hashed.update(f"{cut}\x00{len(row['input_ids']) if row is not None else -1}\x00".encode())
        if row is not None:
            hashed.update(np.asarray(row["input_ids"], dtype=np.int64).tobytes())
            hashed.update(np.asarray(row["labels"], dtype=np.int64).tobytes())
    return hashed.hexdigest()[:16]


def _batches(encoded: list[dict | None], batch_tokens: int) -> list[list[int]]:
    """The rows to score (those not skipped) in the batches of ``plan_batches``."""
    scored = [i for i, row in enumerate(encoded) if row is not None]
    return [[scored[j] for j in b] for b in plan_batches([len(encoded[i]["input_ids"]) for i in scored], batch_tokens)]


def _skipped_row(per_token: bool) -> dict:
    row = {key: float("nan") for key in SCORE_KEYS}
    row["n_tokens"] = 0
    if per_token:
        row["phi"] = []
    return row


def _score_batch(model, tokenizer, rows: list[dict], *, chunk_tokens: int, per_token: bool) -> list[dict]:
    tensors = collate(rows, tokenizer.pad_token_id)
    scores = sequence_scores(model, tensors["input_ids"], tensors["labels"], tensors["attention_mask"],
                             chunk_tokens=chunk_tokens, per_token=per_token)
    out = []
    for j in range(len(rows)):
        row = {key: scores[key][j].item() for key in SCORE_KEYS}
        if per_token:
            row["phi"] = scores["phi"][j].tolist()
        out.append(row)
    return out


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
    on_long: str = "truncate",
    out_dir: str | Path | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
):
    """``dataset`` with the ``ddt_`` columns of each response, scored after its prompt in the
    plain chat template (the student context). Rows keep their input order.

    ``max_length`` caps the tokens of a row (prompt + response). A longer row is, by ``on_long``,
    cut to its first ``max_length`` tokens and scored on the response tokens left ("truncate"),
    or not scored ("skip"); a row whose prompt alone fills ``max_length`` is never scored. What
    was done to each row is in the column ``ddt_cut`` ("" | "truncated" | "skipped_overlong" |
    "skipped_prompt_too_long"); a row that was not scored has NaN scores and ``ddt_n_tokens`` 0,
    and ``summarize`` counts both kinds.

    With ``out_dir`` the work is resumable: the directory is locked and checked writable before
    anything is scored, every batch's scores are saved under ``shards`` (atomically) as soon as
    they exist, and a rerun after a kill scores only the missing batches. ``fingerprint.json``
    records the model (name and a digest of its weights), the tokenised rows and the options; a
    rerun with any of them changed is refused, naming what differs. ``out_dir/scoring.json``
    records the counts and how the rows were shared between processes.

    Launched with several processes (``accelerate launch``, or ``torchrun`` on CPU-only
    machines), batches are dealt round-robin to the processes (``run.map_shards``) and the scores
    gathered back, so every process returns the complete dataset.
    ``per_token`` adds ``ddt_phi`` (a list of φ_t per row) for inspection. A boolean column
    ``<response_column>_truncated`` marks responses cut off at a generation limit, scored without
    the end-of-turn token (``encoding.encode_row``).
    """
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {ON_LONG}, got {on_long!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and a response token), got {max_length}")
    options = {"batch_tokens": batch_tokens, "per_token": per_token, "response_column": response_column,
               "max_length": max_length, "on_long": on_long, "chunk_tokens": chunk_tokens}
    with RunDir(out_dir, "DDT scoring") as run:
        encoded, cuts = _encode(tokenizer, dataset, response_column, max_length, on_long)
        batches = _batches(encoded, batch_tokens)
        if out_dir is not None:  # the digests cost a pass over the weights and the rows
            run.check_inputs({"model": getattr(model.config, "_name_or_path", ""),
                              "model_weights": weights_digest(model), "data": _data_digest(encoded, cuts),
                              "rows": len(encoded), **options})
        mapped = map_shards(lambda batch: _score_batch(model, tokenizer, [encoded[i] for i in batch],
                                                       chunk_tokens=chunk_tokens, per_token=per_token),
                            batches, "DDT scoring", sizes=[len(b) for b in batches], save_dir=run.file("shards"),
                            progress=progress)
        run.write_json("scoring.json", {"rows": len(encoded), **{c: cuts.count(c) for c in CUTS if c},
                                        **mapped.record()})
    by_index = {i: _skipped_row(per_token) for i, row in enumerate(encoded) if row is None}
    by_index.update((i, row) for batch, rows in zip(batches, mapped.results) for i, row in zip(batch, rows))
    return _with_scores(dataset, [by_index[i] for i in range(len(dataset))], cuts, per_token)


def _with_scores(dataset, scores: list[dict], cuts: list[str], per_token: bool):
    """``dataset`` with its ``ddt_`` columns replaced by ``scores`` (one dict per row) and ``cuts``."""
    keys = SCORE_KEYS + (("phi",) if per_token else ())
    stale = [c for c in dataset.column_names if c.startswith(PREFIX)]
    out = dataset.remove_columns(stale) if stale else dataset
    for key in keys:
        out = out.add_column(PREFIX + key, [row[key] for row in scores])
    return out.add_column(CUT_COLUMN, cuts)


def off_distribution(dataset, by: str, level: float) -> list[bool]:
    """Which rows of a scored dataset the test flags as not the model's own writing: the p-value
    below ``level`` (``by="p_value"``) or the mean φ below ``level`` (``by="phi"``). A row without
    a score (NaN: nothing scored) is flagged, since nothing says it is the model's own."""
    column = {"p_value": "pvalue", "phi": "phi_mean"}[by]
    return [not value >= level for value in dataset[PREFIX + column]]


def summarize(dataset) -> dict:
    """Corpus summary of a scored dataset, as plain numbers.

    ``phi_mean``/``phi_median``: over rows of each row's mean φ (the authors' corpus score);
    ``phi_token_mean`` and the tail fractions pool all response tokens; ``reject_rate_1pct``
    is the share of rows whose p-value rejects "written by this model" at the 1% level.
    Short rows give each row's test little power, so the corpus as a whole is also tested:
    ``corpus_z`` = Σ_i Z_i / sqrt(n) (Stouffer), N(0, 1) when every row is the model's own
    sample (rows are independent), with one-sided p-value ``corpus_pvalue`` = Φ(corpus_z).
    ``n_truncated`` and ``n_skipped`` count the rows cut to ``score``'s max_length or left unscored.
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

    cuts = dataset[CUT_COLUMN] if CUT_COLUMN in dataset.column_names else []
    return {
        "n": int(len(phi_mean)),
        "n_truncated": sum(c == "truncated" for c in cuts),
        "n_skipped": sum(c.startswith("skipped") for c in cuts),
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
