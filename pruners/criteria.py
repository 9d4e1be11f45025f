"""Importance of output features (channels, neurons, head rows) by `--criteria`.

Weight criteria read the trained weights and masks: `remain` counts surviving
weights per output row, `magnitude` sums their |w|. Activation criteria run a
few training batches through the model with forward hooks on the scored layers:
`l1` / `l2` take the norm of each output feature over batch (and space/tokens),
`saliency` takes sum |a * dL/da| (first-order Taylor importance, Molchanov et
al. 2017), which needs one backward pass per batch.
"""
import functools
from typing import Callable, Dict, Iterable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.registry import Registry

WEIGHT_CRITERIA = ("remain", "magnitude")
ACTIVATION_CRITERIA = ("l1", "l2", "saliency")
CRITERIA = WEIGHT_CRITERIA + ACTIVATION_CRITERIA

SCORERS: Registry = Registry("criteria", "--criteria")


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(tensor.shape[0], -1).float()


@SCORERS.register("remain")
def remain_scores(modules: Dict[str, nn.Module], masks: Dict[str, torch.Tensor], **_) -> Dict[str, torch.Tensor]:
    return {name: _rows(masks[f"{name}.weight"] != 0).sum(1) for name in modules}


@SCORERS.register("magnitude")
def magnitude_scores(modules: Dict[str, nn.Module], masks: Dict[str, torch.Tensor], **_) -> Dict[str, torch.Tensor]:
    return {name: (_rows(module.weight) * _rows(masks[f"{name}.weight"])).abs().sum(1)
            for name, module in modules.items()}


def _feature_axis_last(output: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] conv maps -> [B*H*W, C]; [B, ..., F] linear outputs -> [*, F]."""
    if output.ndim == 4:
        return output.permute(0, 2, 3, 1).reshape(-1, output.shape[1])
    return output.reshape(-1, output.shape[-1])


def activation_scores(kind: str, modules: Dict[str, nn.Module], model: nn.Module,
                      batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], **_) -> Dict[str, torch.Tensor]:
    totals: Dict[str, torch.Tensor] = {}
    captured: Dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, _inputs, output):
            if kind == "saliency":
                output.retain_grad()
                captured[name] = output
            else:
                flat = _feature_axis_last(output.detach().float())
                value = flat.abs().sum(0) if kind == "l1" else flat.pow(2).sum(0)
                totals[name] = totals.get(name, 0) + value
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for images, labels in batches:
            if kind == "saliency":
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(images), labels).backward()
                for name, output in captured.items():
                    value = _feature_axis_last((output.detach() * output.grad).abs().float()).sum(0)
                    totals[name] = totals.get(name, 0) + value
                captured.clear()
            else:
                with torch.no_grad():
                    model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if not totals:
        raise ValueError("activation criteria need at least one calibration batch")
    return {name: (value.sqrt() if kind == "l2" else value) for name, value in totals.items()}


for _kind in ACTIVATION_CRITERIA:
    SCORERS.register(_kind)(functools.partial(activation_scores, _kind))


def output_scores(criteria: str, modules: Dict[str, nn.Module], masks: Dict[str, torch.Tensor],
                  model: nn.Module, batches: Callable[[], Iterable]) -> Dict[str, torch.Tensor]:
    """Per-output-feature importance of each named module (higher = more important)."""
    if criteria in WEIGHT_CRITERIA:
        return SCORERS[criteria](modules=modules, masks=masks)
    return SCORERS[criteria](modules=modules, model=model, batches=batches())
