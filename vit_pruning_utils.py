"""Public helpers for head-level quasi-structured ViT pruning (the RSST `--vit_structured` mode).

Pure functions on tensors, re-exported from pruners/ so scripts and notebooks can
use them without the round loop:

    from vit_pruning_utils import global_magnitude_masks, regroup_to_heads, is_head_structured
"""
from pruners.channels import regroup_to_channels, top_k_mask
from pruners.criteria import CRITERIA, output_scores
from pruners.heads import (count_to_keep, find_attention_groups, find_mlp_groups, format_head_report, head_masks,
                           head_scores, is_head_structured, regroup_to_heads, regroup_to_neurons)
from pruners.masks import apply_masks, dense_masks, global_magnitude_masks, layer_sparsity, prunable_weights
from pruners.rsst import SCHEDULES, schedule_value

__all__ = [
    "CRITERIA", "SCHEDULES", "apply_masks", "count_to_keep", "dense_masks", "find_attention_groups",
    "find_mlp_groups", "format_head_report", "global_magnitude_masks", "head_masks", "head_scores",
    "is_head_structured", "layer_sparsity", "output_scores", "prunable_weights", "regroup_to_channels",
    "regroup_to_heads", "regroup_to_neurons", "schedule_value", "top_k_mask",
]
