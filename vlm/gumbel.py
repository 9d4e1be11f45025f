"""Gumbel noise that is always finite, and the hard Gumbel-softmax built on it.

torch draws Gumbel noise as -log(E), E ~ Exp(1) (`Tensor.exponential_`, also inside `F.gumbel_softmax`), and its
exponential sampler has returned exactly 0 on some devices and versions (pytorch/pytorch#22442, #22557): one
such draw among the millions of a training run makes the noise +inf and the whole step NaN. Here E is drawn in
float32 and clamped to [smallest normal float32, largest float32], so the noise stays within about ±89.
"""
import torch


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) samples, float32, shaped as `like` and on its device; always finite."""
    info = torch.finfo(torch.float32)
    draws = torch.empty(like.shape, dtype=torch.float32, device=like.device).exponential_()
    return -draws.clamp_(min=info.tiny, max=info.max).log()


def gumbel_softmax_hard(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One-hot samples [..., K] of softmax((logits + Gumbel noise) / temperature) over the last dim, with the
    soft sample's gradient (straight-through), in the dtype of `logits`: `F.gumbel_softmax(hard=True)` with
    `gumbel_noise`, computed in float32. Raises ValueError when temperature <= 0."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    soft = ((logits.float() + gumbel_noise(logits)) / temperature).softmax(dim=-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return (hard - soft.detach() + soft).to(logits.dtype)
