"""The plain reference loops: the oracle every batched backend is tested against.

They run one prompt at a time with one full forward pass per step and no cache, and check the
answer guard and stop strings on the whole decoded text (decoding.rules.text_contains), where the
backends look only at a bounded tail: slow, but with nothing to get wrong.
"""

from __future__ import annotations

import torch

from .mixing import hinted_step, plain_step, stream_keys, stream_seeds, uniforms
from .rules import RepetitionStop, answer_markers, eos_ids, forced_lambda, text_contains
from .sampling import HintedDecodingConfig, SamplingConfig


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return out.logits[:, -1].float().cpu()


@torch.no_grad()
def reference_two_stream(
    model, hinted_ids: list[list[int]], student_ids: list[list[int]], config: HintedDecodingConfig, tokenizer=None,
    seeds: list[int] | None = None, lambdas: list[list[float]] | None = None,
) -> list[list[int]]:
    """Hinted Decoding, one pair at a time, one full uncached forward per stream per step.

    `lambdas`, when a list is given, receives per pair the λ each token was chosen with.
    """
    if len(hinted_ids) != len(student_ids):
        raise ValueError(f"{len(hinted_ids)} hinted prompts but {len(student_ids)} student prompts")
    streams = stream_seeds(config.seed, len(hinted_ids), seeds)
    eos = eos_ids(model, tokenizer)
    markers = answer_markers(config.answer_marker)
    results = []
    for i, (hinted, student) in enumerate(zip(hinted_ids, student_ids)):
        key = stream_keys([streams[i]])
        repeat = RepetitionStop(config.repeat_window, config.repeat_count)
        out: list[int] = []
        lams: list[float] = []
        for step in range(config.max_new_tokens):
            force = forced_lambda(step, text_contains(tokenizer, out, markers), config.first_from_hinted)
            token, lam = hinted_step(
                _last_logits(model, hinted + out),
                _last_logits(model, student + out),
                beta=config.beta,
                top_p=config.top_p,
                temperature=config.temperature,
                u=torch.from_numpy(uniforms(key, len(out))),
                force_lam=torch.tensor([force]),
            )
            out.append(int(token))
            lams.append(float(lam))
            if out[-1] in eos or repeat.push(out[-1]):
                break
        results.append(out)
        if lambdas is not None:
            lambdas.append(lams)
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
            key = stream_keys([streams[i * config.n + j]])
            out: list[int] = []
            for _ in range(config.max_new_tokens):
                token = plain_step(_last_logits(model, prompt + out), top_p=config.top_p,
                                   temperature=config.temperature, u=torch.from_numpy(uniforms(key, len(out))))
                out.append(int(token))
                if out[-1] in eos or text_contains(tokenizer, out, config.stop):
                    break
            completions.append(out)
        results.append(completions)
    return results
