"""The plain reference loops and the stopping rules every backend shares.

The reference loops run one prompt at a time with one full forward pass per step and no
cache: slow, but with nothing to get wrong, so the batched backends are tested against them.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from .config import HintedDecodingConfig, SamplingConfig
from .mixing import generators_for, hinted_step, plain_step, stream_seeds


class RepetitionStop:
    """Degenerate-repetition stop: some `window`-token window has occurred `count` times.

    Windows are counted incrementally as tokens arrive; only the newest window can reach the
    count, so one Counter lookup per token gives the same answer as rescanning.
    """

    def __init__(self, window: int, count: int):
        self.window, self.count = window, count
        self.seen: Counter = Counter()
        self.ids: list[int] = []

    def push(self, token: int) -> bool:
        self.ids.append(token)
        if len(self.ids) < self.window:
            return False
        key = tuple(self.ids[-self.window :])
        self.seen[key] += 1
        return self.seen[key] >= self.count


def repetition_length(ids: list[int], window: int, count: int) -> int | None:
    """The first length at which `ids` trips the repetition stop, or None."""
    stop = RepetitionStop(window, count)
    for i, token in enumerate(ids):
        if stop.push(token):
            return i + 1
    return None


class AnswerGuard:
    """Tells, before each step, whether the generated text already contains the answer marker."""

    def __init__(self, tokenizer, marker: str):
        self.tokenizer, self.marker = tokenizer, marker
        self.tripped = False

    @property
    def active(self) -> bool:
        return self.tokenizer is not None and bool(self.marker)

    def check(self, generated: list[int]) -> bool:
        if self.active and not self.tripped and generated:
            self.tripped = self.marker in self.tokenizer.decode(generated, skip_special_tokens=False)
        return self.tripped


def forced_lambda(step: int, guard_tripped: bool, first_from_hinted: bool) -> float:
    """λ forced by the rules of §5: 1 after the answer marker, 0 for the first token, else NaN (free)."""
    if guard_tripped:
        return 1.0
    if step == 0 and first_from_hinted:
        return 0.0
    return math.nan


def eos_ids(model, tokenizer=None) -> set[int]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def stop_string_hit(tokenizer, generated: list[int], stops: list[str]) -> bool:
    if not stops or tokenizer is None:
        return False
    text = tokenizer.decode(generated, skip_special_tokens=False)
    return any(s in text for s in stops)


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return out.logits[:, -1].float().cpu()


@torch.no_grad()
def reference_two_stream(
    model, hinted_ids: list[list[int]], student_ids: list[list[int]], config: HintedDecodingConfig, tokenizer=None,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """Hinted Decoding, one pair at a time, one full uncached forward per stream per step."""
    if len(hinted_ids) != len(student_ids):
        raise ValueError(f"{len(hinted_ids)} hinted prompts but {len(student_ids)} student prompts")
    streams = stream_seeds(config.seed, len(hinted_ids), seeds)
    eos = eos_ids(model, tokenizer)
    results = []
    for i, (hinted, student) in enumerate(zip(hinted_ids, student_ids)):
        gen = generators_for([streams[i]])
        guard = AnswerGuard(tokenizer, config.answer_marker)
        repeat = RepetitionStop(config.repeat_window, config.repeat_count)
        out: list[int] = []
        for step in range(config.max_new_tokens):
            force = forced_lambda(step, guard.check(out), config.first_from_hinted)
            token, _ = hinted_step(
                _last_logits(model, hinted + out),
                _last_logits(model, student + out),
                beta=config.beta,
                top_p=config.top_p,
                temperature=config.temperature,
                generators=gen,
                force_lam=torch.tensor([force]),
            )
            out.append(int(token))
            if out[-1] in eos or repeat.push(out[-1]):
                break
        results.append(out)
    return results


@torch.no_grad()
def reference_sample(model, prompt_ids: list[list[int]], config: SamplingConfig, tokenizer=None,
                     seeds: list[int] | None = None) -> list[list[list[int]]]:
    """Plain sampling, one completion at a time, one full uncached forward per step."""
    streams = stream_seeds(config.seed, len(prompt_ids), seeds, per_row=config.n)
    eos = eos_ids(model, tokenizer)
    results = []
    for i, prompt in enumerate(prompt_ids):
        completions = []
        for j in range(config.n):
            gen = generators_for([streams[i * config.n + j]])
            out: list[int] = []
            for _ in range(config.max_new_tokens):
                token = plain_step(_last_logits(model, prompt + out), top_p=config.top_p,
                                   temperature=config.temperature, generators=gen)
                out.append(int(token))
                if out[-1] in eos or stop_string_hit(tokenizer, out, config.stop):
                    break
            completions.append(out)
        results.append(completions)
    return results
