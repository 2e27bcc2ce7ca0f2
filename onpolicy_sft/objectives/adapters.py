"""Running Hugging Face causal LMs through the objectives.

``causal_lm_loss`` runs only the decoder body (models.decoder_hidden_states) and hands the last
hidden states plus the lm_head weight to the fused path, so the [B, T, V] logits never exist.
``trainer_loss_func`` plugs an objective into ``transformers.Trainer(compute_loss_func=...)``,
which always hands over the model's full logits (the materialised path).
Batches are collate() output: input_ids, attention_mask, UNSHIFTED labels (−100 where ignored).
"""

from __future__ import annotations

from typing import Callable

import torch

from onpolicy_sft.models import decoder_hidden_states, lm_head_weight
from onpolicy_sft.objectives.engine import DEFAULT_CHUNK_TOKENS, Source, flatten_valid, token_logps
from onpolicy_sft.objectives.objective import Objective
from onpolicy_sft.ops import IGNORE_INDEX
from onpolicy_sft.packing import packed_hidden_states


def _hidden(model, batch, packed: bool = False) -> torch.Tensor:
    """Hidden states of positions 0..T−2, which predict labels 1..T−1 (padding-free when ``packed``)."""
    if packed:
        return packed_hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    return decoder_hidden_states(model, batch["input_ids"], batch.get("attention_mask"))[:, :-1]


def causal_lm_loss(
    model, objective: Objective, batch, *, teacher=None, ref=None, progress=None, ref_logps=None, packed=False
):
    """(loss, metrics) of ``objective`` on ``model`` for one batch, through the fused path.

    Teacher and reference run under no_grad the same way (decoder body, lm_head weight). For DPO
    the reference's sequence log-probs are computed from ``ref`` when ``ref_logps`` is not given.
    ``packed`` runs every decoder padding-free (onpolicy_sft.packing); the result is the same.
    """
    context = {"progress": progress}
    frozen = {"teacher": teacher, "ref": ref}
    for role in ("teacher", "ref"):
        if role in objective.accepts and frozen[role] is not None:
            with torch.no_grad():
                context[f"{role}_hidden"] = _hidden(frozen[role], batch, packed)
            context[f"{role}_lm_head_weight"] = lm_head_weight(frozen[role]).detach()
    if "ref_logps" in objective.needs:
        if ref_logps is None and ref is not None:
            ref_logps = sequence_logps(ref, batch, packed=packed)
        context["ref_logps"] = ref_logps
    return objective.fused(_hidden(model, batch, packed), lm_head_weight(model), batch["labels"][:, 1:], **context)


@torch.no_grad()
def sequence_logps(model, batch, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, packed: bool = False) -> torch.Tensor:
    """Σ_t log p(y_t) over each row's response tokens, [B], chunked (no full logits), no gradient."""
    labels = batch["labels"][:, 1:]
    labels_v, rows, (hidden_v,) = flatten_valid(labels, _hidden(model, batch, packed))
    logp, _ = token_logps(Source(hidden=hidden_v, weight=lm_head_weight(model)), labels_v, chunk_tokens)
    return torch.zeros(labels.shape[0], dtype=logp.dtype, device=logp.device).index_add_(0, rows, logp)


def trainer_loss_func(objective: Objective, progress: Callable[[], float] | None = None):
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for transformers.Trainer.

    The Trainer treats such a loss as already normalised over the whole accumulated batch, and
    counts ``num_items_in_batch`` over the shifted labels; so the token mean is rescaled to
    Σ_t L_t / num_items_in_batch. Only objectives that need no teacher/reference fit this
    signature. The latest metrics are kept on the returned function as ``.last_metrics``.
    """
    if objective.needs or objective.pairwise:
        raise ValueError(
            f"{objective.name} needs {sorted(objective.needs) or 'pairs'}: use causal_lm_loss "
            "(or onpolicy_sft.train) instead of Trainer(compute_loss_func=...)"
        )

    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        shifted = labels[:, 1:]
        context = {"progress": progress()} if progress is not None else {}
        loss, metrics = objective.from_logits(logits[:, :-1], shifted, **context)
        compute_loss.last_metrics = metrics
        if num_items_in_batch is None:
            return loss
        n_local = (shifted != IGNORE_INDEX).sum()
        return loss * n_local.to(loss.dtype) / torch.as_tensor(num_items_in_batch, device=loss.device).to(loss.dtype)

    compute_loss.last_metrics = {}
    return compute_loss
