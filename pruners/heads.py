"""Head-level quasi-structured regrouping for ViTs (RSST's `--vit_structured`): pure mask math.

After the element-wise global L1 step, each attention block keeps whole heads:
the top heads by `--criteria`, as many as match the block's element-wise
density (Python round(), halves to even, at least one) so head sparsity compounds
round after round, plus refill+'s round((H - that) x fillback_rate) more. A kept
head is all-1 in its q, k, v rows of `qkv` and its input columns of `proj`; a
dropped head is all-0. MLPs regroup to neurons the same way (fc1 rows with the
matching fc2 columns; a GLU's two rows per neuron together). Heads are never
deleted physically: masks only. Which modules form the groups: pruners/groups.py.
"""
from typing import Tuple

import torch

from pruners.channels import top_k_mask


def count_to_keep(density: float, groups: int, fillback_rate: float = 0.0) -> int:
    """Whole groups (heads, neurons) to keep: k = round(density x groups), at least one, then
    refill+ adds round((groups - k) x fillback_rate). Python round(): halves to even."""
    if not 0.0 <= fillback_rate <= 1.0:
        raise ValueError(f"fillback_rate must be in [0, 1], got {fillback_rate}")
    kept = max(1, min(groups, int(round(density * groups))))
    return min(groups, kept + int(round((groups - kept) * fillback_rate)))


def combined_density(*masks: torch.Tensor) -> float:
    return sum(float((m != 0).sum()) for m in masks) / sum(m.numel() for m in masks)


def head_scores(qkv_row_scores: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Sum the per-row scores of qkv ([3 * dim], laid out [3, heads, head_dim]) per head."""
    return qkv_row_scores.float().view(3, num_heads, -1).sum(dim=(0, 2))


def head_masks(keep_heads: torch.Tensor, qkv_like: torch.Tensor, proj_like: torch.Tensor) -> Tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """qkv mask (whole rows of kept heads) and proj mask (whole input columns of kept heads)."""
    num_heads = keep_heads.numel()
    head_dim = proj_like.shape[1] // num_heads
    per_feature = keep_heads.to(proj_like.device).repeat_interleave(head_dim)  # [dim]
    qkv_rows = per_feature.repeat(3)  # [3 * dim], [3, heads, head_dim] order
    qkv = qkv_rows.to(qkv_like.dtype).view(-1, 1).expand_as(qkv_like).clone()
    proj = per_feature.to(proj_like.dtype).view(1, -1).expand_as(proj_like).clone()
    return qkv, proj


def regroup_to_heads(qkv_mask: torch.Tensor, proj_mask: torch.Tensor, scores: torch.Tensor,
                     fillback_rate: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the top heads by `scores` [heads] matching the block's element-wise density (+ refill+).

    qkv_mask [3 * heads * head_dim, dim], proj_mask [dim_out, heads * head_dim];
    returns (qkv mask, proj mask, bool keep [heads]).
    """
    count = count_to_keep(combined_density(qkv_mask, proj_mask), scores.numel(), fillback_rate)
    keep = top_k_mask(scores, count)
    qkv, proj = head_masks(keep, qkv_mask, proj_mask)
    return qkv, proj, keep


def neuron_scores(fc1_row_scores: torch.Tensor, hidden: int) -> torch.Tensor:
    """Per-neuron scores [hidden] from per-row scores of a (packed) fc1 [chunks * hidden]: a GLU's
    value and gate rows of neuron j (rows j and hidden + j) add up."""
    return fc1_row_scores.float().view(-1, hidden).sum(0)


def regroup_to_neurons(fc1_mask: torch.Tensor, fc2_mask: torch.Tensor, scores: torch.Tensor,
                       fillback_rate: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep whole hidden neurons matching the MLP's density (+ refill+).

    fc1_mask [chunks * hidden, dim] (chunks 2 for a GLU's [value; gate] rows), fc2_mask
    [dim_out, hidden], scores [hidden]; returns (fc1 mask, fc2 mask, bool keep [hidden]).
    Raises ValueError when fc1's rows are not a multiple of fc2's inputs.
    """
    hidden = fc2_mask.shape[1]
    if fc1_mask.shape[0] % hidden or scores.numel() != hidden:
        raise ValueError(f"fc1 rows {fc1_mask.shape[0]} / scores {scores.numel()} do not match {hidden} neurons")
    keep = top_k_mask(scores, count_to_keep(combined_density(fc1_mask, fc2_mask), hidden, fillback_rate))
    rows = keep.repeat(fc1_mask.shape[0] // hidden)
    fc1 = rows.to(fc1_mask.device, fc1_mask.dtype).view(-1, 1).expand_as(fc1_mask).clone()
    fc2 = keep.to(fc2_mask.device, fc2_mask.dtype).view(1, -1).expand_as(fc2_mask).clone()
    return fc1, fc2, keep


def is_head_structured(qkv_mask: torch.Tensor, proj_mask: torch.Tensor, num_heads: int) -> bool:
    """Every head all-0 or all-1 across its qkv rows and proj columns together."""
    head_dim = proj_mask.shape[1] // num_heads  # attention width may differ from the embedding width
    rows = (qkv_mask != 0).reshape(3, num_heads, head_dim, -1).transpose(0, 1).reshape(num_heads, -1)
    cols = (proj_mask != 0).reshape(-1, num_heads, head_dim).transpose(0, 1).reshape(num_heads, -1)
    per_head = torch.cat([rows, cols], dim=1)
    return bool((per_head.all(1) | (~per_head).all(1)).all())


def format_head_report(name: str, weight_shape, num_heads: int, scores: torch.Tensor, keep: torch.Tensor,
                       element_sparsity: float, head_sparsity: float) -> str:
    kept = [int(i) for i in torch.sort(-scores.float(), stable=True).indices if keep[i]]
    return (f"{name}  shape={tuple(weight_shape)} heads={num_heads} head_dim={weight_shape[0] // (3 * num_heads)}\n"
            f"  head importance: [{' '.join(f'{float(s):.2f}' for s in scores)}]  "
            f"keep {int(keep.sum())}/{num_heads} heads: [{' '.join(map(str, kept))}]\n"
            f"  sparsity: element-wise {100 * element_sparsity:.2f}% -> head-level {100 * head_sparsity:.2f}%")
