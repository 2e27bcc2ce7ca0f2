"""LoRA adapters through peft: apply them for training, save the adapter and the merged model.

LoRA (Hu et al. 2021, arXiv 2106.09685) trains W + (α/r)·B·A with W frozen. The fused objective
path keeps working unchanged: it runs the adapted decoder body (the adapters sit inside its
linear layers) and reads the lm_head weight through ``models.lm_head_weight``, which adds the
head's low-rank update when the head itself is targeted; otherwise the head is frozen.

A trained checkpoint directory holds the merged model (plain transformers weights, so every
later stage, vLLM included, loads it like any other checkpoint) and the adapter in ``adapter/``.
peft is imported lazily: it is only needed when ``train.peft.rank`` > 0.
"""

from __future__ import annotations

import copy
from pathlib import Path

from onpolicy_sft.config import PeftConfig

ADAPTER_DIR = "adapter"


def apply_lora(model, config: PeftConfig):
    """``model`` wrapped as a peft model with fresh LoRA adapters; only the adapters require grad.

    The wrapped model's linear layers are replaced in place, so ``model`` itself is modified too.
    """
    if config.rank <= 0:
        raise ValueError(f"train.peft.rank must be positive to apply LoRA, got {config.rank}")
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(config.target_modules) - names)
    if missing:
        raise ValueError(
            f"train.peft.target_modules: {missing} name no module of {type(model).__name__} "
            f"(its linear layers include {sorted(n for n in names if n.endswith('proj') or n == 'lm_head')})"
        )
    if "lm_head" in config.target_modules and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError(
            "train.peft.target_modules: lm_head is tied to the input embedding in this model, so merging its "
            "adapter would change the embedding too (the merged model would not be the trained one); leave "
            "lm_head out of target_modules"
        )
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_copy(model):
    """A plain transformers model with the adapters folded into its weights; ``model`` is left as it is.

    Merging a copy (instead of merge/unmerge in place) keeps the trained weights bit-exact.
    """
    return copy.deepcopy(model).merge_and_unload()


def save_lora(model, out_dir: str | Path) -> Path:
    """The adapter to ``out_dir/adapter`` and the merged model to ``out_dir`` (both safetensors)."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir / ADAPTER_DIR, safe_serialization=True)
    merged_copy(model).save_pretrained(out_dir, safe_serialization=True)
    return out_dir
