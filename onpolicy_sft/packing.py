"""Padding-free forward passes: a micro-batch's rows run as one packed sequence.

A padded micro-batch [B, T] spends compute on B·T positions although only Σ n_i are real. Here
the decoder body runs once over the concatenation of the rows, [1, Σ n_i], with position ids
that restart at 0 for every row. transformers turns restarting position ids into a block-diagonal
causal mask (``masking_utils.find_packed_sequence_indices`` for sdpa/eager; varlen kernels for
flash attention), so no token attends across rows. The hidden states are then scattered back
into the padded [B, T, H] layout, so that everything downstream (labels, the fused objectives,
DPO's per-row sums) sees exactly the batch it would have seen padded: packing changes the cost
of the decoder, not the batch format.

Rows must be contiguous in their padded row (right or left padding, as ``encoding.collate`` makes).
With sdpa/eager attention transformers materialises the block-diagonal mask as [L, L] booleans
for L packed tokens; flash_attention_2 works from the position ids and needs no mask.
"""

from __future__ import annotations

import torch


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed ids [1, L], position ids [1, L], flat index [L] of each packed token in the [B·T] layout)."""
    mask = attention_mask.bool()
    index = mask.flatten().nonzero().squeeze(-1)  # row-major: each row's tokens stay together and in order
    positions = (mask.long().cumsum(-1) - 1).flatten()[index]
    return input_ids.flatten()[index].unsqueeze(0), positions.unsqueeze(0), index


def unpack(packed: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Packed features [L, X] back to the padded layout [B, T, X], zeros at padding (differentiable)."""
    out = packed.new_zeros(shape[0] * shape[1], packed.shape[-1])
    return out.index_copy(0, index, packed).view(shape[0], shape[1], packed.shape[-1])


def packed_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] (after the final norm) of a padded batch, computed padding-free.

    Equal to ``models.decoder_hidden_states(model, input_ids, attention_mask)`` at every real
    position (padding positions are 0 here); the attention implementation must honour packed
    position ids (sdpa, eager and flash_attention_2 do).
    """
    ids, positions, index = pack(input_ids, attention_mask)
    body = model.get_decoder()
    hidden = body(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0]
    return unpack(hidden, index, tuple(input_ids.shape))

