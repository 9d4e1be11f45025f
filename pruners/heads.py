"""Head-level quasi-structured regrouping for ViTs (RSST's `--vit_structured`).

After the element-wise global L1 step, each attention block keeps whole heads:
the top heads by `--criteria`, as many as match the block's element-wise
density (rounded, at least one), so head sparsity compounds round after round.
A kept head is all-1 in its q, k, v rows of `qkv` and its input columns of
`proj`; a dropped head is all-0. MLPs regroup to neurons (fc1 rows with the
matching fc2 columns). Heads are never deleted physically: masks only.

Works on any timm-style ViT: blocks whose attention module has `qkv`, `proj`
and `num_heads` (qkv rows laid out [3, heads, head_dim]), and MLPs with `fc1`
and `fc2`.
"""
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn as nn

from pruners.channels import top_k_mask


@dataclass(frozen=True)
class AttentionGroup:
    qkv: str  # module names
    proj: str
    num_heads: int


@dataclass(frozen=True)
class MlpGroup:
    fc1: str
    fc2: str


def find_attention_groups(model: nn.Module) -> List[AttentionGroup]:
    return [AttentionGroup(f"{name}.qkv", f"{name}.proj", int(module.num_heads))
            for name, module in model.named_modules()
            if isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "proj", None),
                                                                                  nn.Linear)
            and hasattr(module, "num_heads")]


def find_mlp_groups(model: nn.Module) -> List[MlpGroup]:
    return [MlpGroup(f"{name}.fc1", f"{name}.fc2") for name, module in model.named_modules()
            if isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(getattr(module, "fc2", None),
                                                                                  nn.Linear)]


def count_to_keep(density: float, groups: int) -> int:
    """Whole groups matching a density: rounded, at least one."""
    return max(1, min(groups, int(round(density * groups))))


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


def regroup_to_heads(qkv_mask: torch.Tensor, proj_mask: torch.Tensor, scores: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the top heads by `scores` matching the block's element-wise density."""
    keep = top_k_mask(scores, count_to_keep(combined_density(qkv_mask, proj_mask), scores.numel()))
    qkv, proj = head_masks(keep, qkv_mask, proj_mask)
    return qkv, proj, keep


def regroup_to_neurons(fc1_mask: torch.Tensor, fc2_mask: torch.Tensor, scores: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep whole hidden neurons (fc1 rows + fc2 columns) matching the MLP's density."""
    keep = top_k_mask(scores, count_to_keep(combined_density(fc1_mask, fc2_mask), scores.numel()))
    fc1 = keep.to(fc1_mask.device, fc1_mask.dtype).view(-1, 1).expand_as(fc1_mask).clone()
    fc2 = keep.to(fc2_mask.device, fc2_mask.dtype).view(1, -1).expand_as(fc2_mask).clone()
    return fc1, fc2, keep


def is_head_structured(qkv_mask: torch.Tensor, proj_mask: torch.Tensor, num_heads: int) -> bool:
    """Every head all-0 or all-1 across its qkv rows and proj columns together."""
    dim = proj_mask.shape[0]
    rows = (qkv_mask != 0).reshape(3, num_heads, dim // num_heads, -1).transpose(0, 1).reshape(num_heads, -1)
    cols = (proj_mask != 0).reshape(dim, num_heads, dim // num_heads).transpose(0, 1).reshape(num_heads, -1)
    per_head = torch.cat([rows, cols], dim=1)
    return bool((per_head.all(1) | (~per_head).all(1)).all())


def format_head_report(name: str, weight_shape, num_heads: int, scores: torch.Tensor, keep: torch.Tensor,
                       element_sparsity: float, head_sparsity: float) -> str:
    kept = [int(i) for i in torch.sort(-scores.float(), stable=True).indices if keep[i]]
    return (f"{name}  shape={tuple(weight_shape)} heads={num_heads} head_dim={weight_shape[1] // num_heads}\n"
            f"  head importance: [{' '.join(f'{float(s):.2f}' for s in scores)}]  "
            f"keep {int(keep.sum())}/{num_heads} heads: [{' '.join(map(str, kept))}]\n"
            f"  sparsity: element-wise {100 * element_sparsity:.2f}% -> head-level {100 * head_sparsity:.2f}%")
