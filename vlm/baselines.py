"""Training-free keep deciders to compare the learned pruner against at the same token budget (issue 11 item 6).

A keep decider (vlm/pruned_forward.py) has a `layers` attribute and `decide(layer, hidden [B,S,D],
vision_index long [B,n], vision_valid bool [B,n], question_hidden [B,Q,D], question_mask bool [B,Q],
training, temperature) -> keep [B,n] float` (1 = keep). The two here keep an exact number of tokens per
sample, so the equivalent token budget T̄ = Σ_l n_l / L (mean vision tokens over the L decoder layers) is set
by `keep_counts_for_budget` rather than learned:

- `RandomDrop`: keeps k uniformly random vision tokens per sample at each of its layers (seeded).
- `FastVDrop`: at one layer (FastV's K = 2) keeps the k vision tokens the last text token attends to most,
  averaged over heads. SDPA returns no attention weights, so the row is recomputed from the layer's own
  weights: x = input_layernorm(hidden); q = q_proj(x[query]), k = k_proj(x), RoPE at the sequence index
  (equal to the original position up to a constant when no earlier layer dropped tokens, and RoPE scores
  depend only on the offset); softmax(q kᵀ · head_dim^-1/2) per head over the keys from the first real token
  up to the query, then the mean over heads. The query is the last question token when the decider is given a
  question mask aligned with the sequence (vlm.pruned_forward does: so teacher-forced answer tokens are never
  the query and left padding is left out of the softmax), else the last position.
"""
from typing import List, Optional, Sequence, Union

import torch
from transformers.models.llama.modeling_llama import rotate_half

from vlm.hard_drop import top_k_keep


def _counts(keep_tokens: Union[int, Sequence[int]], layers: Sequence[int]) -> List[int]:
    """One keep count per layer (an int applies to every layer); ValueError naming `keep_tokens`."""
    counts = [int(keep_tokens)] * len(layers) if isinstance(keep_tokens, int) else [int(k) for k in keep_tokens]
    if len(counts) != len(layers) or any(k < 0 for k in counts):
        raise ValueError(f"keep_tokens must be one count >= 0 per layer of {list(layers)}, got {keep_tokens}")
    return counts


class RandomDrop:
    """Keep `keep_tokens[i]` uniformly random valid vision tokens per sample at `layers[i]` (tokens remaining
    after that layer; an int applies to every layer). Draws come from a CPU generator seeded with `seed`;
    `reset()` restarts it, so two passes over the same batches (e.g. soft and hard mode) drop the same tokens.
    Raises ValueError for unsorted/duplicate layers or bad keep_tokens."""

    def __init__(self, layers: Sequence[int], keep_tokens: Union[int, Sequence[int]], seed: int = 0):
        self.layers = [int(layer) for layer in layers]
        if not self.layers or self.layers != sorted(set(self.layers)) or self.layers[0] < 0:
            raise ValueError(f"layers must be distinct increasing indices >= 0, got {list(layers)}")
        self.keep_tokens = dict(zip(self.layers, _counts(keep_tokens, self.layers)))
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        """Restart the random stream at `seed`."""
        self.generator = torch.Generator().manual_seed(self.seed)

    def decide(self, layer, hidden, vision_index, vision_valid, question_hidden=None, question_mask=None,
               training=False, temperature=1.0) -> torch.Tensor:
        """keep float [B, n]: k random valid tokens per row (all valid ones if fewer than k)."""
        scores = torch.rand(vision_index.shape, generator=self.generator).to(vision_index.device)
        return top_k_keep(scores, vision_valid, self.keep_tokens[layer]).to(hidden.dtype)


class FastVDrop:
    """FastV-style drop: at `layer` keep the `keep_tokens` vision tokens with the highest head-averaged
    attention from the last token (module docstring: how the row is computed without attention weights).

    model: the LlavaForConditionalGeneration (or anything `vlm.llava.llava_parts` accepts) whose decoder layer
    `layer` supplies input_layernorm, q_proj, k_proj, and whose rotary_emb supplies RoPE. Raises ValueError if
    the model is missing, `layer` is outside its decoder or keep_tokens < 0."""

    def __init__(self, layer: int = 2, keep_tokens: int = None, model=None):
        if model is None or keep_tokens is None:
            raise ValueError("FastVDrop needs model= (the LLaVA model) and keep_tokens=")
        from vlm.llava import llava_parts
        self.language_model = llava_parts(model).language_model
        depth = len(self.language_model.layers)
        if not 0 <= int(layer) < depth:
            raise ValueError(f"FastVDrop layer={layer} is outside the decoder's {depth} layers")
        self.layers = [int(layer)]
        self.keep_tokens = dict(zip(self.layers, _counts(int(keep_tokens), self.layers)))

    def attention_row(self, hidden: torch.Tensor, query_index: Optional[torch.Tensor] = None,
                      key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 [B, S]: attention of position query_index (long [B]; default the last) to every position at
        this layer, mean over heads. Keys after the query or with key_valid (bool [B, S]) False get weight 0."""
        decoder_layer = self.language_model.layers[self.layers[0]]
        attention = decoder_layer.self_attn
        x = decoder_layer.input_layernorm(hidden)
        batch, length, _ = x.shape
        head_dim = attention.head_dim
        slots = torch.arange(length, device=x.device)
        if query_index is None:
            query_index = torch.full((batch,), length - 1, device=x.device)
        rows = torch.arange(batch, device=x.device)
        query = attention.q_proj(x[rows, query_index]).view(batch, -1, 1, head_dim)            # [B, H, 1, d]
        key = attention.k_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)           # [B, Hkv, S, d]
        cos, sin = self.language_model.rotary_emb(x, slots.unsqueeze(0).expand(batch, -1))   # [B, S, d]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query_cos, query_sin = cos[rows, :, query_index].unsqueeze(2), sin[rows, :, query_index].unsqueeze(2)
        query = query * query_cos + rotate_half(query) * query_sin
        key = key * cos + rotate_half(key) * sin
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)                    # grouped-query heads
        logits = (query.float() @ key.float().transpose(-1, -2)).squeeze(2) * head_dim ** -0.5     # [B, H, S]
        allowed = slots[None, :] <= query_index[:, None]
        if key_valid is not None:
            allowed = allowed & key_valid
        logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
        return logits.softmax(dim=-1).mean(dim=1)

    def decide(self, layer, hidden, vision_index, vision_valid, question_hidden=None, question_mask=None,
               training=False, temperature=1.0) -> torch.Tensor:
        """keep float [B, n]: the k valid vision tokens with the highest attention_row at their positions.

        When question_mask is aligned with the sequence (bool [B, S], as vlm.pruned_forward passes it), the
        query is each sample's last question token and keys before its first question or vision token (left
        padding) are left out; otherwise the query is the last position and every key counts."""
        query_index = key_valid = None
        length = hidden.shape[1]
        if question_mask is not None and tuple(question_mask.shape) == tuple(hidden.shape[:2]):
            slots = torch.arange(length, device=hidden.device).expand_as(question_mask)
            query_index = torch.where(question_mask, slots, -1).amax(dim=1).clamp(min=0)
            first_vision = torch.where(vision_valid, vision_index, length).amin(dim=1)
            first_question = torch.where(question_mask, slots, length).amin(dim=1)
            key_valid = slots >= torch.minimum(first_vision, first_question)[:, None]
        with torch.no_grad():
            row = self.attention_row(hidden, query_index, key_valid)
        scores = row.gather(1, vision_index.clamp(min=0, max=length - 1))
        return top_k_keep(scores, vision_valid, self.keep_tokens[layer]).to(hidden.dtype)


def vision_tokens_per_layer(num_tokens: int, pruning_layers: Sequence[int], keep_tokens: Sequence[int],
                            num_layers: int) -> List[float]:
    """Vision tokens entering each of the `num_layers` decoder layers when `num_tokens` enter layer 0 and the
    decision at pruning_layers[i] (taken on that layer's input) leaves keep_tokens[i]."""
    counts, current = [], float(num_tokens)
    remaining = dict(zip(pruning_layers, keep_tokens))
    for layer in range(num_layers):
        current = float(remaining.get(layer, current))
        counts.append(current)
    return counts


def keep_counts_for_budget(target_budget: float, num_tokens: int, pruning_layers: Sequence[int],
                           num_layers: int) -> List[int]:
    """Keep counts, one per pruning layer, that give the equivalent token budget T̄ = Σ_l n_l / L closest to
    `target_budget` (within half a token: each count is rounded once), with the same keep ratio r at every
    pruning layer (k_i = round(num_tokens · r^(i+1))), found by bisection on r.

    The lowest reachable T̄ keeps nothing from the first pruning layer on: num_tokens · pruning_layers[0] / L
    (288 merged tokens and layers [10, 20, 31] of 32: 90). Raises ValueError naming the target when it is
    outside [that minimum, num_tokens] or the layers are not increasing indices < num_layers."""
    layers = [int(layer) for layer in pruning_layers]
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"pruning_layers must be increasing indices < {num_layers}, got {list(pruning_layers)}")
    lowest = num_tokens * layers[0] / num_layers
    if not lowest <= target_budget <= num_tokens:
        raise ValueError(f"target token budget {target_budget:g} is outside [{lowest:g}, {num_tokens}] for "
                         f"{num_tokens} tokens and pruning layers {layers} of {num_layers}")

    def budget(ratio: float) -> float:
        keep = [num_tokens * ratio ** (i + 1) for i in range(len(layers))]
        return sum(vision_tokens_per_layer(num_tokens, layers, keep, num_layers)) / num_layers

    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if budget(middle) < target_budget else (low, middle)
    return [int(round(num_tokens * high ** (i + 1))) for i in range(len(layers))]
