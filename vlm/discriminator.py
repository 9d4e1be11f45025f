"""Discriminator that tells pruned (fake) from unpruned (real) LLM runs by their hidden states (SPEC §5).

Per named layer (default -1, -3, -5 of the model's `output.hidden_states`, where -1 is the final,
normed output): masked mean-pool over the sequence, LayerNorm (LLaMA hidden states carry a few huge
"massive activation" channels that would otherwise dominate), concatenate the layers, MLP -> one logit.
Logit > 0 means "real" (unpruned forward); train it with BCE-with-logits, target 1 for real, 0 for fake.
Pooling works on any sequence length per layer, so hidden states of a `hard` pruned forward (fewer
tokens after each pruning layer) and of an unpruned forward are scored alike.
"""
from collections.abc import Sequence

import torch
from torch import nn


class Discriminator(nn.Module):
    """Args: dim — hidden size D; layers — indices into `hidden_states` (negative from the end);
    d_internal — MLP width.
    forward(hidden_states: sequence of [B, S_l, D] (one entry per model layer output, any S_l),
    masks: sequence of bool [B, S_l] aligned with hidden_states (True = a real token) | None (all real))
    -> logits float [B] in the discriminator's dtype. Only the layers in `layers` are read; masked
    positions never reach the result (not even NaN / inf there). Raises ValueError when a named layer
    does not exist, shapes disagree, or a sample has no unmasked position in a named layer.
    """

    def __init__(self, dim: int, layers: Sequence[int] = (-1, -3, -5), d_internal: int = 256):
        super().__init__()
        if not layers:
            raise ValueError("discriminator layers must name at least one hidden-state layer")
        self.layers = tuple(int(layer) for layer in layers)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in self.layers)
        self.mlp = nn.Sequential(nn.Linear(dim * len(self.layers), d_internal), nn.GELU(),
                                 nn.Linear(d_internal, d_internal), nn.GELU(), nn.Linear(d_internal, 1))

    def _pooled(self, hidden: torch.Tensor, mask, layer: int) -> torch.Tensor:
        """Masked mean over the sequence: [B, S, D] -> [B, D]."""
        if mask is None:
            return hidden.mean(dim=1)
        if mask.shape != hidden.shape[:2]:
            raise ValueError(f"discriminator layer {layer}: mask {tuple(mask.shape)} does not match "
                             f"hidden states {tuple(hidden.shape)}")
        counts = mask.sum(dim=1)
        if bool((counts == 0).any()):
            raise ValueError(f"discriminator layer {layer}: a sample has no unmasked position")
        summed = hidden.masked_fill(~mask[..., None], 0).sum(dim=1)  # masked_fill: NaN there stays out
        return summed / counts[:, None].to(hidden.dtype)

    def forward(self, hidden_states, masks=None) -> torch.Tensor:
        count = len(hidden_states)
        if any(not -count <= layer < count for layer in self.layers):
            raise ValueError(f"discriminator layers {self.layers} need more than the {count} hidden-state "
                             f"layers given")
        if masks is not None and len(masks) != count:
            raise ValueError(f"{len(masks)} masks for {count} hidden-state layers")
        dtype = self.mlp[0].weight.dtype
        pooled = [norm(self._pooled(hidden_states[layer].to(dtype),
                                    None if masks is None else masks[layer], layer))
                  for layer, norm in zip(self.layers, self.norms)]
        return self.mlp(torch.cat(pooled, dim=-1)).squeeze(-1)
