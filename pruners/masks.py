"""Pure mask math: global L1 magnitude masks, application, sparsity.

Masks are dicts {parameter name: 0/1 tensor shaped like the weight}. Functions
here take and return tensors; they know nothing of rounds, files or logging.
"""
from typing import Dict, Iterable

import torch
import torch.nn as nn

Masks = Dict[str, torch.Tensor]
PRUNABLE_MODULES = (nn.Conv2d, nn.Linear)


def prunable_weights(model: nn.Module, exclude: Iterable[nn.Module] = ()) -> Dict[str, nn.Parameter]:
    """Weights of conv and linear layers, by parameter name; `exclude` lists modules left dense
    (a container excludes every layer inside it, e.g. a classifier built as a Sequential)."""
    excluded = {id(inner) for module in exclude for inner in module.modules()}
    return {f"{name}.weight" if name else "weight": module.weight
            for name, module in model.named_modules()
            if isinstance(module, PRUNABLE_MODULES) and id(module) not in excluded}


def dense_masks(weights: Dict[str, torch.Tensor]) -> Masks:
    return {name: torch.ones_like(w) for name, w in weights.items()}


def global_magnitude_masks(weights: Dict[str, torch.Tensor], masks: Masks, rate: float) -> Masks:
    """Remove `rate` of the *remaining* weights: the smallest |w| across all layers.

    Already-pruned weights stay pruned. Ties break deterministically by layer
    order (as given) and position, so the removed count is exact.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    names = list(weights)
    survivors = [(masks[n] != 0).flatten() for n in names]
    scores = torch.cat([w.detach().abs().flatten().float()[s] for w, s in zip((weights[n] for n in names), survivors)])
    remaining = scores.numel()
    to_remove = remaining - int(round(remaining * (1.0 - rate)))
    keep_flat = torch.ones(remaining, dtype=torch.bool)
    if to_remove > 0:
        order = torch.sort(scores.cpu(), stable=True).indices
        keep_flat[order[:to_remove]] = False
    out, offset = {}, 0
    for name, alive in zip(names, survivors):
        alive = alive.cpu()
        count = int(alive.sum())
        new = torch.zeros(alive.numel(), dtype=torch.bool)
        new[alive] = keep_flat[offset:offset + count]
        offset += count
        out[name] = new.view_as(masks[name]).to(device=masks[name].device, dtype=masks[name].dtype)
    return out


def random_masks_like(masks: Masks, generator: torch.Generator) -> Masks:
    """Masks with the same kept count per layer as `masks`, at uniformly random positions (element-wise):
    the lottery-ticket "random pruning" control (Frankle & Carbin 2019, sec. 2; open_lth's
    `randomly_prune` branch). Shapes, dtypes and devices follow `masks`; `generator` (CPU) fixes the draw."""
    out = {}
    for name, mask in masks.items():
        kept = int((mask != 0).sum())
        chosen = torch.randperm(mask.numel(), generator=generator)[:kept]
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[chosen] = True
        out[name] = flat.view(mask.shape).to(device=mask.device, dtype=mask.dtype)
    return out


def apply_masks(weights: Dict[str, torch.Tensor], masks: Masks) -> None:
    """Zero the pruned weights in place."""
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask)


def union(a: Masks, b: Masks) -> Masks:
    return {name: torch.maximum(a[name], b[name]) for name in a}


def difference(keep: Masks, drop_from: Masks) -> Masks:
    """Entries alive in `keep` but dead in `drop_from` (e.g. element-wise kept, structure dropped)."""
    return {name: keep[name] * (1 - drop_from[name]) for name in keep}


def remaining_count(masks: Masks) -> int:
    return int(sum(int((m != 0).sum()) for m in masks.values()))


def total_count(masks: Masks) -> int:
    return int(sum(m.numel() for m in masks.values()))


def remaining_fraction(masks: Masks) -> float:
    total = total_count(masks)
    return remaining_count(masks) / total if total else 1.0


def layer_sparsity(masks: Masks) -> Dict[str, float]:
    return {name: 1.0 - float((m != 0).sum()) / m.numel() for name, m in masks.items()}


def to_storage(masks: Masks) -> Masks:
    """Compact bool copies on the CPU, for checkpoints."""
    return {name: (m != 0).cpu() for name, m in masks.items()}


def from_storage(stored: Masks, like: Dict[str, torch.Tensor]) -> Masks:
    return {name: stored[name].to(device=like[name].device, dtype=like[name].dtype) for name in like}
