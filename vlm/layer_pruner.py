"""`LayerSpecificPruner`: one learnable keep head per LLM pruning layer (SPEC §5 stage 2, issue 11 item 2).

It is a keep decider for `vlm.pruned_forward`: at each of its `pruning_layers` the forward-pre-hooks of
`vlm.layer_hooks` hand it the layer's input hidden states and where each sample's still-kept vision tokens
sit (`vision_index`, derived from `input_ids == image_token_id`, so left padding and earlier drops are
accounted for); its head scores those tokens against the question tokens' hidden states of the same layer
and `keep_mask` turns the logits into a keep mask (Gumbel-softmax straight-through in training, logit > 0
at eval). Hooks are attached only for the duration of one forward (`layer_hooks` context manager).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from vlm.hard_drop import gather_tokens, top_k_keep
from vlm.pruner_heads import VisionPrunerHead, VisionPrunerHeadSimple, keep_mask

PRUNER_TYPES = ("cross_attention", "simple")


class LayerSpecificPruner(nn.Module):
    """One head per layer of `pruning_layers` (a ModuleDict keyed by str(layer)).

    dim: the LLM hidden size D; num_layers: the LLM depth L; pruner_type "cross_attention"
    (VisionPrunerHead, vision -> question cross-attention with `num_heads`) or "simple"
    (VisionPrunerHeadSimple, MLP on the vision tokens); d_internal: the heads' width.
    keep_ratio: the training budget `pruner_keep_ratio` or None. At eval a head keeps the tokens with
    logit > 0 when it is None, else the top max(1, round(keep_ratio · n)) logits of each sample's n vision
    tokens: a budget trained on the mean keep probability can be met by uniform logits (e.g. all at
    sigmoid⁻¹(0.78) = 1.27), which the threshold would keep entirely.
    Raises ValueError naming `pruning_layers` (a layer outside 0..L-1, repeated or none), `pruner_type`
    or `keep_ratio` (outside (0, 1]).
    """

    def __init__(self, dim: int, num_layers: int, pruning_layers: Sequence[int] = (10, 20, 31),
                 pruner_type: str = "cross_attention", d_internal: int = 512, num_heads: int = 4,
                 keep_ratio: Optional[float] = None):
        super().__init__()
        if keep_ratio is not None and not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio={keep_ratio} must be in (0, 1] (pruner_keep_ratio), or None")
        self.keep_ratio = keep_ratio
        layers = [int(layer) for layer in pruning_layers]
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if not layers or bad or len(set(layers)) != len(layers):
            raise ValueError(f"pruning_layers {list(pruning_layers)} must be distinct layers in 0..{num_layers - 1} "
                             f"(the model has {num_layers} decoder layers)")
        if pruner_type not in PRUNER_TYPES:
            raise ValueError(f"pruner_type={pruner_type!r} is not one of {list(PRUNER_TYPES)}")
        self.layers = sorted(layers)
        self.num_layers = num_layers
        self.pruner_type = pruner_type

        def head() -> nn.Module:
            if pruner_type == "simple":
                return VisionPrunerHeadSimple(dim, d_internal=d_internal)
            return VisionPrunerHead(dim, d_internal=d_internal, num_heads=num_heads)

        self.heads = nn.ModuleDict({str(layer): head() for layer in self.layers})

    def keep_logits(self, layer: int, hidden: torch.Tensor, vision_index: torch.Tensor,
                    vision_valid: torch.Tensor, question_hidden: torch.Tensor,
                    question_mask: torch.Tensor) -> torch.Tensor:
        """Keep logits [B, n] of layer `layer`'s head for the vision tokens hidden[b, vision_index[b]]."""
        vision = gather_tokens(hidden, vision_index)
        return self.heads[str(layer)](vision, question_hidden, question_mask, vision_valid)

    def static_keep_count(self, layer: int, num_tokens: int) -> Optional[int]:
        """Vision tokens per sample kept at `layer` when n = `num_tokens` enter it at eval: max(1, round(keep_ratio
        · n)) as `decide` computes it (float32 product, half to even; at most n), or None without `keep_ratio`
        (the logit threshold keeps a data-dependent count). Used by vlm.static_plan (captured prefill)."""
        if self.keep_ratio is None or layer not in self.layers:
            return None
        return min(num_tokens, int(self.keep_counts(torch.tensor([num_tokens]))[0]))

    def keep_counts(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Tokens kept per sample at eval with `keep_ratio`: max(1, round(keep_ratio · n)) for n = num_tokens
        (long tensor of any shape; float32 product, half to even)."""
        return (num_tokens * self.keep_ratio).round().clamp(min=1).long()

    def decide(self, layer: int, hidden: torch.Tensor, vision_index: torch.Tensor, vision_valid: torch.Tensor,
               question_hidden: torch.Tensor, question_mask: torch.Tensor, training: bool,
               temperature: float) -> torch.Tensor:
        """Keep mask [B, n] (float; 0 on invalid slots) for the vision tokens at vision_index long [B, n].

        hidden [B, S, D]: the layer's input hidden states; question_hidden [B, Q, D] with question_mask bool
        [B, Q]; training: Gumbel-softmax straight-through at `temperature`; eval: logit > 0, or the top
        round(keep_ratio · n) logits per sample when `keep_ratio` is set."""
        logits = self.keep_logits(layer, hidden, vision_index, vision_valid, question_hidden, question_mask)
        if not training and self.keep_ratio is not None:
            counts = self.keep_counts(vision_valid.sum(dim=1, keepdim=True))
            return top_k_keep(logits, vision_valid, counts).to(logits.dtype)
        return keep_mask(logits, temperature, training) * vision_valid.to(logits.dtype)
