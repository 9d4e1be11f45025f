"""Public helpers for head-level quasi-structured ViT pruning (the RSST `--vit_structured` mode).

Pure functions on tensors, re-exported from pruners/ so scripts and notebooks can
use them without the round loop:

    from vit_pruning_utils import global_magnitude_masks, regroup_to_heads, is_head_structured
"""
from models import classifier_modules, dense_modules, stem_modules
from pruners.channels import channels_to_keep, regroup_to_channels, top_k_mask
from pruners.criteria import CRITERIA, output_scores
from pruners.groups import UnsupportedLayout, find_attention_groups, find_mlp_groups
from pruners.heads import (count_to_keep, format_head_report, head_masks, head_scores, is_head_structured,
                           neuron_scores, regroup_to_heads, regroup_to_neurons)
from pruners.masks import apply_masks, dense_masks, global_magnitude_masks, layer_sparsity, prunable_weights
from pruners.rsst import SCHEDULES, schedule_value

__all__ = [
    "CRITERIA", "SCHEDULES", "UnsupportedLayout", "apply_masks", "channels_to_keep", "classifier_modules",
    "count_to_keep", "dense_masks", "dense_modules", "find_attention_groups", "find_mlp_groups",
    "format_head_report", "global_magnitude_masks", "head_masks", "head_scores", "is_head_structured",
    "layer_sparsity", "neuron_scores", "output_scores", "prunable_weights", "regroup_to_channels",
    "regroup_to_heads", "regroup_to_neurons", "schedule_value", "stem_modules", "top_k_mask",
]
