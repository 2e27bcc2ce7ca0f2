"""Saving a model's weights for a generation engine to read."""

from __future__ import annotations


def save_here(model, directory, tokenizer=None) -> None:
    """save_pretrained (safetensors) on this process, whatever its rank.

    transformers writes nothing on a rank other than 0 once torch.distributed is initialised, which
    is right for a trained model and wrong for a copy only this process reads (its own vLLM engine's
    weights, a conversion made under its own lock).
    """
    shadow = "should_save_on_this_rank"  # transformers' per-rank check; older versions lack it
    if hasattr(model, shadow):
        setattr(model, shadow, lambda is_main_process: True)
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        model.__dict__.pop(shadow, None)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
