"""FSDP2 (torch's ``fully_shard``) for training, and full-weight state dicts of a sharded model.

accelerate applies FSDP only to accelerator processes (under ``accelerate launch`` with an FSDP
config on GPUs); on CPU processes it ignores the plugin. ``train.fsdp: true`` shards here
instead, on any device and process group (gloo on CPU, nccl on GPU): every decoder layer is one
FSDP unit, and the ``ObjectiveModel`` wrapping model and objective is the root unit.

The fused objectives multiply hidden states by the whole lm_head weight, which outside a
forward pass is only this process's shard (a DTensor). Because the root unit is the module
whose ``forward`` computes the loss, the root's parameters (embeddings, final norm, lm_head) are
unsharded for exactly that forward, the fused loss sees the full weight, and its gradient is
reduce-scattered back onto the shards after backward like any other.

Whichever way a model was sharded, its parameters are DTensors; ``is_sharded`` tells, and
``full_state`` / ``load_full_state`` convert between the shards and ordinary full tensors, so
that resume states and final checkpoints are the same safetensors/JSON files as unsharded runs
write (the optimizer state keyed by parameter name instead of position).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

# torch.distributed.{tensor,fsdp,checkpoint} are imported where used: they take seconds to
# import, and only sharded runs need them.


def _dtensor_type():
    """The DTensor class if torch.distributed.tensor is loaded; if it is not, no tensor can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module.DTensor if module is not None else None


def decoder_layers(model) -> nn.ModuleList:
    """The repeated transformer blocks of a causal LM (the FSDP units)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"train.fsdp: cannot find the decoder layers of {type(model).__name__} "
                         "(expected model.get_decoder().layers)")
    return layers


def shard(wrapped: nn.Module, model, mixed_precision: str = "no") -> nn.Module:
    """Shard ``wrapped`` (an ObjectiveModel around ``model``) in place: one unit per decoder layer, ``wrapped`` the root.

    With ``mixed_precision`` "bf16"/"fp16" the units compute in that dtype and reduce gradients in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    policy = MixedPrecisionPolicy(param_dtype=dtypes[mixed_precision], reduce_dtype=torch.float32) if (
        mixed_precision in dtypes) else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(wrapped, mp_policy=policy)
    return wrapped


def is_sharded(module: nn.Module) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full weights on CPU; every process must call it (the main process gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(module: nn.Module, optimizer) -> dict:
    """The optimizer's full state keyed by parameter name; every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: nn.Module, weights: dict[str, torch.Tensor], optimizer=None, optimizer_state=None) -> None:
    """Scatter full weights (and optimizer state) read on every process onto the module's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, weights, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)


def grad_norm_value(norm) -> float:
    """A gradient norm as a float: clipping sharded gradients returns it as a DTensor."""
    dtensor = _dtensor_type()
    return float(norm.full_tensor() if dtensor is not None and isinstance(norm, dtensor) else norm)
