"""Preference pairs from the model's own samples, for the DPO@k and SimPO@k baselines (docs/methods.md §6).

For each prompt the model draws k answers at temperature 1; each is verified against the
reference answer. A prompt with at least one correct and one incorrect sample gives the pair
(first correct, first incorrect): the samples are i.i.d., so "first" is a uniformly random
choice that needs no extra random state. A prompt whose k samples are all incorrect has no
on-policy pair; by the ``no_pair`` setting it either takes the demonstration as the chosen side
(against the first incorrect sample) or is dropped. A prompt whose samples are all correct has
nothing to reject and is always dropped. Every case is counted. A sample cut off at the token
limit is marked (``chosen_truncated`` / ``rejected_truncated``) so that it is trained and scored
without an end-of-turn token the model never wrote.

DPO's reference log-probs r(y) = Σ_t log π_ref(y_t | x, y_<t) are computed once for the whole
pair set with the fused path (``add_reference_logps``), stored in the columns
``ref_chosen_logp`` / ``ref_rejected_logp`` beside the token ids they were computed on, and
saved with the pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path

import datasets
import torch

from decoding import make_backend
from decoding.rules import eos_ids
from decoding.sampling import SamplingConfig
from onpolicy_sft.encoding import collate, encode_row_prompt
from onpolicy_sft.schema import EXEMPLARS
from onpolicy_sft.train_data import tokenize_for_training
from onpolicy_sft.evaluate import row_seeds
from onpolicy_sft.grading import is_correct
from onpolicy_sft.objectives.adapters import sequence_logps
from onpolicy_sft.run import map_shares
from onpolicy_sft.rundir import save_into, write_text

logger = logging.getLogger(__name__)

NO_PAIR_CHOICES = ("demonstration", "drop")
COLUMNS = ["id", "prompt", "system", "exemplars", "chosen", "rejected", "chosen_truncated", "rejected_truncated", "answer",
           "pair_source", "n_correct"]


def _with_defaults(row: dict, row_id: str) -> dict:
    return {**row, "id": row_id, "system": row.get("system") or "", "exemplars": row.get("exemplars") or []}


def _pair(row: dict, samples: list[list[int]], tokenizer, stops: set[int], max_new_tokens: int, no_pair: str):
    """(the pair of one prompt or None, which case it was, its numbers of samples and of correct ones)."""
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
    truncated = [len(s) >= max_new_tokens and (not s or s[-1] not in stops) for s in samples]
    verdicts = [bool(is_correct(t, row["answer"])) for t in texts]
    correct = [(t, cut) for t, cut, ok in zip(texts, truncated, verdicts) if ok]
    wrong = [(t, cut) for t, cut, ok in zip(texts, truncated, verdicts) if not ok]
    if correct and wrong:
        case, chosen, source = "mixed", correct[0], "samples"
    elif wrong:
        case = "all_incorrect"
        chosen, source = ((row["response"], False), "demonstration") if no_pair == "demonstration" else (None, None)
    else:
        case, chosen, source = "all_correct", None, None
    counted = (len(samples), len(correct))
    if chosen is None:
        return None, case, counted
    return {"id": row["id"], "prompt": row["prompt"], "system": row["system"], "exemplars": row["exemplars"],
            "chosen": chosen[0],
            "rejected": wrong[0][0], "chosen_truncated": chosen[1], "rejected_truncated": wrong[0][1],
            "answer": str(row["answer"]), "pair_source": source, "n_correct": len(correct)}, case, counted


def build_pairs(
    model,
    tokenizer,
    dataset,
    *,
    k: int = 8,
    backend=None,
    sampling=None,
    no_pair: str = "demonstration",
    seed: int = 0,
):
    """(pairs, counts) from ``k`` temperature-1 samples per prompt of ``dataset``.

    ``dataset`` has columns prompt and answer (and response, the demonstration, when
    ``no_pair == "demonstration"``; optional id and system). ``sampling`` is a
    ``decoding.sampling.SamplingConfig`` for everything but n and seed, which are always ``k``
    and ``seed``; by default temperature 1, top-p 1, 256 new tokens. ``backend`` must serve
    ``model``'s weights (in this process); without one an hf backend is made for this call.
    Under launched processes the prompts are split between them (each sample's stream is
    seeded by its row, so the pairs equal one process's) and every process returns all pairs.

    pairs: a Dataset with id, prompt, system, chosen, rejected, chosen_truncated, rejected_truncated
    (cut off at the token limit), answer, pair_source ("samples" | "demonstration") and n_correct
    (correct samples of the prompt). counts: prompts, samples, correct_samples, mixed,
    all_incorrect, all_correct, kept, dropped, and processes / rows_per_process (the split).
    """
    if no_pair not in NO_PAIR_CHOICES:
        raise ValueError(f"no_pair must be one of {NO_PAIR_CHOICES}, got {no_pair!r}")
    if k < 2:
        raise ValueError(f"k must be >= 2 to find a correct and an incorrect sample, got {k}")
    needed = {"prompt", "answer"} | ({"response"} if no_pair == "demonstration" else set())
    missing = needed - set(dataset.column_names)
    if missing:
        raise ValueError(f"build_pairs needs columns {sorted(needed)}; the dataset lacks {sorted(missing)}")
    sampling = sampling or SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=256)
    sampling = dataclasses.replace(sampling, n=k, seed=seed)

    n = len(dataset)
    ids = dataset["id"] if "id" in dataset.column_names else [str(i) for i in range(n)]

    def share(rows: list[int]) -> list[tuple]:
        prompts = [encode_row_prompt(tokenizer, dataset[i]) for i in rows]
        with nullcontext(backend) if backend is not None else make_backend("hf", model, tokenizer) as serving:
            samples = serving.sample(prompts, sampling, seeds=row_seeds(seed, rows, n, k))
        stops = eos_ids(model, tokenizer)
        return [_pair(_with_defaults(dataset[i], ids[i]), completions, tokenizer, stops, sampling.max_new_tokens,
                      no_pair) for i, completions in zip(rows, samples)]

    mapped = map_shares(share, n, "preference pairs")
    results = mapped.results
    counts = {"prompts": n, "samples": sum(c[0] for _, _, c in results), "correct_samples": sum(c[1] for _, _, c in results),
              "mixed": 0, "all_incorrect": 0, "all_correct": 0}
    for _, case, _ in results:
        counts[case] += 1
    pairs = [pair for pair, _, _ in results if pair is not None]
    counts.update(kept=len(pairs), dropped=n - len(pairs), **mapped.record())
    logger.info("preference pairs: %s", counts)
    if not pairs:
        return datasets.Dataset.from_dict({c: [] for c in COLUMNS}).cast_column("exemplars", EXEMPLARS), counts
    return datasets.Dataset.from_list(pairs).cast_column("exemplars", EXEMPLARS), counts


@torch.no_grad()
def add_reference_logps(ref_model, tokenizer, pairs, *, max_length: int, batch_size: int = 8):
    """``pairs`` tokenized as the trainer tokenizes them, plus ref_chosen_logp / ref_rejected_logp.

    The token columns (chosen_/rejected_ input_ids and labels) are kept so that the trainer
    reuses exactly the tokens the reference log-probs were computed on. Sums are float32 from
    ``objectives.adapters.sequence_logps`` (chunked over tokens, no full [B, T, V] logits).
    """
    pairs = tokenize_for_training(pairs, tokenizer, max_length=max_length, pairwise=True)[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(ref_model.parameters()).device
    was_training = ref_model.training
    ref_model.eval()
    out = {"chosen": [], "rejected": []}
    for side in out:
        ids, labels = pairs[f"{side}_input_ids"], pairs[f"{side}_labels"]
        for start in range(0, len(pairs), batch_size):
            rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ids[start : start + batch_size],
                                                                      labels[start : start + batch_size])]
            batch = {key: value.to(device) for key, value in collate(rows, pad).items()}
            out[side].extend(float(v) for v in sequence_logps(ref_model, batch).float().cpu())
    ref_model.train(was_training)
    for side, values in out.items():
        name = f"ref_{side}_logp"
        if name in pairs.column_names:
            pairs = pairs.remove_columns(name)
        pairs = pairs.add_column(name, values)
    return pairs


def cached_reference_logps(ref_model, tokenizer, pairs, cache_dir: str | Path, *, max_length: int):
    """``add_reference_logps`` computed once per ``cache_dir`` and saved there: a rerun on the same
    pairs and max_length (a resumed training, say) reads them back instead of running the reference."""
    cache_dir = Path(cache_dir)
    columns = ("prompt", "system", "chosen", "rejected", "chosen_truncated", "rejected_truncated")
    content = json.dumps([list(pairs[c]) for c in columns if c in pairs.column_names])
    key = {"pairs_sha256": hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest(), "max_length": max_length}
    stamp = cache_dir / "cache_key.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        logger.info("reference log-probs: reading the cache in %s", cache_dir)
        return datasets.load_from_disk(str(cache_dir / "pairs"))
    logger.info("reference log-probs of %d pairs: computing once, cached in %s", len(pairs), cache_dir)
    pairs = add_reference_logps(ref_model, tokenizer, pairs, max_length=max_length)
    stamp.unlink(missing_ok=True)  # the stamp goes last, so a half-written cache is never read
    save_into(cache_dir, lambda d: pairs.save_to_disk(str(d / "pairs")))
    write_text(stamp, json.dumps(key))
    return pairs
