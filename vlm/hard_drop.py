"""Batched sequence surgery for vision-token pruning: packing the kept tokens of each sample to the right
(re-padding on the left), scattering per-vision-token values back onto the sequence, and the per-layer
additive attention bias. Pure tensor functions, no per-sample Python loop, no model code.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

NEG_INF = float("-inf")


def left_pack(keep: torch.Tensor, width: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices that move each row's kept positions to the right end, order preserved, padding on the left.

    keep: bool [B, S]. Returns (index long [B, S'], valid bool [B, S']) with S' = `width` if given, else the
    largest kept count; `index[b, j]` is the source position of slot j of row b (0 on the padding slots,
    where valid is False). Without `width` one host sync (S' is a shape); with it none: the caller
    guarantees no row keeps more than `width` (the static-count prefill, where every row keeps exactly that).
    """
    batch, length = keep.shape
    count = keep.sum(dim=1)
    if width is None:
        width = int(count.max()) if batch else 0
    target = width - count[:, None] + keep.long().cumsum(dim=1) - 1
    target = torch.where(keep, target, torch.full_like(target, width))  # dropped -> a dump column
    source = torch.arange(length, device=keep.device).expand(batch, length)
    index = torch.zeros(batch, width + 1, dtype=torch.long, device=keep.device)
    index.scatter_(1, target, source)
    valid = torch.arange(width, device=keep.device)[None, :] >= (width - count)[:, None]
    return index[:, :width], valid


def gather_tokens(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, S, *rest] gathered along dim 1 at index long [B, S'] -> [B, S', *rest]."""
    expanded = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    return values.gather(1, expanded)


def scatter_to_tokens(values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, length: int,
                      fill) -> torch.Tensor:
    """Per-vision-token values [B, n] placed at their sequence positions index [B, n] of a [B, length] tensor
    filled with `fill` elsewhere; entries with valid False are discarded. Differentiable w.r.t. values."""
    target = torch.where(valid, index, torch.full_like(index, length))
    out = torch.full((values.shape[0], length + 1), fill, dtype=values.dtype, device=values.device)
    return out.scatter(1, target, values)[:, :length]


def attention_bias(key_bias: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive SDPA mask [B, 1, q, K] for the last `query_length` of K sequence slots.

    key_bias: float [B, K], 0 for an attendable key, -inf for a padding or dropped key, log(keep) in
    training. Causal in slot order (query t sits at slot K - q + t). -inf becomes the dtype's lowest finite
    value, so a fully masked (padding) query row gives finite uniform weights instead of NaN.
    """
    keys = key_bias.shape[1]
    slots = torch.arange(keys, device=key_bias.device)
    causal = slots[None, :] <= slots[keys - query_length:, None]
    bias = torch.where(causal[None, None], key_bias[:, None, None, :].float(), NEG_INF)
    return bias.to(dtype).clamp_min(torch.finfo(dtype).min)  # -inf stays -inf in any dtype, then clamps


def padding_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE position ids [B, S] for a left-padded batch: 0, 1, ... over each row's attended tokens (padding
    slots get 0), so a padded sample sees the positions it would have alone."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or in its own dtype when that is wider (float64 stays float64): scores and rankings are
    never computed below float32, nor rounded below the model's own precision (a float64 test model keeps
    float64 rankings, so two runs cannot tie-break differently where float32 would round two scores together)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def top_k_keep(scores: torch.Tensor, vision_valid: torch.Tensor, keep_tokens) -> torch.Tensor:
    """Float [B, n] mask with 1 on the min(keep_tokens, valid count) highest-scoring valid tokens of each row.

    scores float [B, n]; vision_valid bool [B, n] (False on padded vision slots, never kept); keep_tokens an
    int, or a long tensor [B, 1] of per-row counts. Ties are broken by position (stable sort)."""
    scores = at_least_float32(scores).masked_fill(~vision_valid, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ((rank < keep_tokens) & vision_valid).float()
