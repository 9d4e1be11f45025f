"""Fixed keep counts for a hard-mode prefill without host syncs (issue 11 item 9: capturing the prefill).

The dynamic hard prefill (vlm/pruned_forward.py) reads each drop's kept count back to the host to size the
shorter sequence (`left_pack`), checks on the host whether a layer needs a mask, and lists the vision tokens
per layer with `.tolist()`. When every sample keeps a number of tokens that is known before the forward —
M merge centres, then at each pruning layer a count that depends only on how many tokens enter it (the
benchmark's top-k deciders; `LayerSpecificPruner` with `pruner_keep_ratio`) — every shape is known in
advance: a `StaticPlan` holds them, worked out once on the host by `static_plan`, and the prefill then runs
with no host sync at all, so it can be recorded in a CUDA graph (vlm/graphed_prefill.py).

A decider states its fixed count with `static_keep_count(layer, num_tokens) -> int | None` (tokens per
sample it keeps at `layer` when `num_tokens` enter it; None when the count depends on the data).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from vlm.llava import llava_parts, num_image_tokens, vision_positions


@dataclass(frozen=True)
class StaticPlan:
    """Shapes of one static-count hard prefill.

    image_tokens: N image placeholders per sample (the tower's tokens); llm_tokens: vision tokens per sample
    entering the LLM (M merge centres, or N without a merger); keep: {pruning layer: vision tokens per sample
    kept there}; masked: whether the layers get a 4-D additive mask (a padded batch) or none (SDPA causal);
    num_layers: the decoder depth L."""
    image_tokens: int
    llm_tokens: int
    keep: Dict[int, int] = field(default_factory=dict)
    masked: bool = False
    num_layers: int = 0

    def tokens_per_layer(self) -> List[float]:
        """Vision tokens per sample entering each of the L decoder layers (a pruning layer runs on its kept
        tokens), as `PrunedOutput.vision_tokens_per_layer` lists them."""
        counts, tokens = [], self.llm_tokens
        for layer in range(self.num_layers):
            tokens = self.keep.get(layer, tokens)
            counts.append(float(tokens))
        return counts


def static_plan(model, batch: dict, decider=None, merger=None) -> StaticPlan:
    """The StaticPlan of a hard prefill of `batch` with `merger` and `decider`; one host sync (the batch check).

    Raises ValueError naming `input_ids` when a sample does not hold exactly N image placeholders, naming the
    decider when it has no fixed count at a layer (no `static_keep_count`, or it returns None: for
    `LayerSpecificPruner` set `pruner_keep_ratio`), or when a count is outside 0..tokens entering."""
    image_tokens = num_image_tokens(model.config)
    counts = vision_positions(batch["input_ids"], model.config.image_token_id).sum(dim=1)
    low, high, padded = torch.stack([counts.min(), counts.max(),
                                     (~batch["attention_mask"].bool()).any().long()]).tolist()
    if low != image_tokens or high != image_tokens:
        raise ValueError(f"input_ids: each sample needs {image_tokens} image_token_id "
                         f"({model.config.image_token_id}) placeholders, got {low}..{high}")
    tokens = merger.num_centres if merger is not None else image_tokens
    llm_tokens, keep = tokens, {}
    for layer in sorted(int(layer) for layer in getattr(decider, "layers", [])):
        count_of = getattr(decider, "static_keep_count", None)
        count = count_of(layer, tokens) if count_of is not None else None
        if count is None:
            raise ValueError(f"static keep counts: {type(decider).__name__} keeps a data-dependent number of "
                             f"tokens at layer {layer} (needs static_keep_count(layer, n) -> int; "
                             f"LayerSpecificPruner: set pruner_keep_ratio)")
        if not 0 <= int(count) <= tokens:
            raise ValueError(f"static keep counts: {type(decider).__name__} keeps {count} of {tokens} tokens at "
                             f"layer {layer}")
        keep[layer] = tokens = int(count)
    return StaticPlan(image_tokens, llm_tokens, keep, bool(padded), llava_parts(model).num_layers)
