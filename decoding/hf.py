"""Generation with a transformers model: batched, left-padded, one KV cache, any device.

Hinted Decoding runs its two streams as the two halves of ONE batch (hinted rows, then
student rows), so each lock-step costs a single forward pass of 2B one-token rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .backend import Backend, check_prompts
from .mixing import hinted_step, plain_step, stream_keys, stream_seeds, uniforms
from .rules import RepetitionStop, TailWatch, answer_markers, eos_ids, forced_lambda
from .sampling import HintedDecodingConfig, SamplingConfig


class CachedBatch:
    """Left-padded rows that advance together one token per step with a KV cache.

    Positions come from the attention mask, so a left-padded row sees exactly the positions
    it would see alone; that is what makes batched decoding equal one-by-one decoding.
    """

    def __init__(self, model, rows: list[list[int]], pad_id: int, max_new_tokens: int):
        device = next(model.parameters()).device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        # The mask of every step is a prefix view of one buffer: no per-step copy that grows with length.
        full = torch.ones((len(rows), width + max_new_tokens), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            full[i, : width - len(row)] = 0
        self.model, self.full, self.width = model, full.to(device), width
        mask = self.full[:, :width]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids.to(device), attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]
        self.next_pos = positions[:, -1:] + 1

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; return the next logits [R, V]."""
        self.width += 1
        out = self.model(
            input_ids=tokens.to(self.full.device).view(-1, 1),
            attention_mask=self.full[:, : self.width],
            position_ids=self.next_pos,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]
        self.next_pos = self.next_pos + 1
        return self.logits


def _pad_id(model, tokenizer, eos: set[int]) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return min(eos) if eos else 0


@torch.no_grad()
def hf_two_stream(
    model, hinted_ids: list[list[int]], student_ids: list[list[int]], config: HintedDecodingConfig, tokenizer=None,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    check_prompts(hinted_ids, student_ids)
    streams = stream_seeds(config.seed, len(hinted_ids), seeds)
    eos = eos_ids(model, tokenizer)
    pad = _pad_id(model, tokenizer, eos)
    results: list[list[int]] = []
    for start in range(0, len(hinted_ids), config.batch_size):
        stop = start + config.batch_size
        results += _two_stream_batch(
            model, hinted_ids[start:stop], student_ids[start:stop], config, tokenizer, eos, pad, streams[start:stop]
        )
    return results


def _two_stream_batch(model, hinted, student, config, tokenizer, eos, pad, seeds) -> list[list[int]]:
    n = len(hinted)
    keys = stream_keys(seeds)
    markers = answer_markers(config.answer_marker)
    guards = [TailWatch(tokenizer, markers) for _ in range(n)]
    repeats = [RepetitionStop(config.repeat_window, config.repeat_count) for _ in range(n)]
    outs: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    batch = CachedBatch(model, hinted + student, pad, config.max_new_tokens)
    logits = batch.logits
    for step in range(config.max_new_tokens):
        force = torch.tensor([forced_lambda(step, g.found, config.first_from_hinted) for g in guards])
        tokens, _ = hinted_step(
            logits[:n], logits[n:], beta=config.beta, top_p=config.top_p, temperature=config.temperature,
            u=torch.from_numpy(uniforms(keys, step)), force_lam=force,
        )
        for i, token in enumerate(tokens.tolist()):
            if not done[i]:
                outs[i].append(token)
                guards[i].push(token)
                done[i] = token in eos or repeats[i].push(token)
        if all(done) or step + 1 == config.max_new_tokens:
            break
        logits = batch.step(torch.cat([tokens, tokens]))
    return outs


@torch.no_grad()
def hf_sample(model, prompt_ids: list[list[int]], config: SamplingConfig, tokenizer=None, batch_rows: int = 32,
              seeds: list[int] | None = None):
    check_prompts(prompt_ids)
    streams = stream_seeds(config.seed, len(prompt_ids), seeds, per_row=config.n)
    eos = eos_ids(model, tokenizer)
    pad = _pad_id(model, tokenizer, eos)
    if config.stop and tokenizer is None:
        raise ValueError("SamplingConfig.stop strings need a tokenizer: build the backend with one")
    rows = [(i, j) for i in range(len(prompt_ids)) for j in range(config.n)]
    flat: list[list[int]] = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        keys = stream_keys(streams[start : start + batch_rows])
        outs: list[list[int]] = [[] for _ in chunk]
        stops = [TailWatch(tokenizer, config.stop) for _ in chunk]
        done = [False] * len(chunk)
        batch = CachedBatch(model, [prompt_ids[i] for i, _ in chunk], pad, config.max_new_tokens)
        logits = batch.logits
        for step in range(config.max_new_tokens):
            tokens = plain_step(logits, top_p=config.top_p, temperature=config.temperature,
                                u=torch.from_numpy(uniforms(keys, step)))
            for k, token in enumerate(tokens.tolist()):
                if not done[k]:
                    outs[k].append(token)
                    done[k] = token in eos or stops[k].push(token)
            if all(done) or step + 1 == config.max_new_tokens:
                break
            logits = batch.step(tokens)
        flat += outs
    return [flat[i * config.n : (i + 1) * config.n] for i in range(len(prompt_ids))]


class HFBackend(Backend):
    """The transformers backend, on a model in memory. Options: batch_rows (rows per forward in
    `sample`, default 32)."""

    name = "hf"

    def __init__(self, model, tokenizer=None, *, batch_rows: int = 32):
        if isinstance(model, (str, Path)):
            raise TypeError(f"the hf backend generates with a model in memory, not a path ({model!r}): load it first")
        self.model, self.tokenizer, self.batch_rows = model, tokenizer, batch_rows

    def sample(self, prompt_ids, config, seeds=None):
        return hf_sample(self.model, prompt_ids, config, self.tokenizer, self.batch_rows, seeds)

    def two_stream(self, hinted_ids, student_ids, config, tokenizer=None, seeds=None):
        return hf_two_stream(self.model, hinted_ids, student_ids, config, tokenizer, seeds)

    def update_weights(self, model) -> None:
        self.model = model
