"""Importance of output features (channels, neurons, head rows) by `--criteria`.

One score per output row of each scored layer (a conv's output channel, a
Linear's output feature), as the references define them
(Structure-LTH `prune_model_custom_fillback`, RSST `vit_pruning_utils*.py`):

  remain     surviving weights of the row under the new element-wise mask
  magnitude  sum |w| over the row's *whole* trained weight (zero only where an
             earlier round pruned; the new element-wise mask is not applied)
  l1         sum |a| of the row's output a over batch and space/tokens
  l2         sum a^2 (no square root: the channel reference sums squares, and the
             ViT reference's sqrt(mean a^2) per head is a monotone function of the
             head's total, so summing squares per row keeps its ranking)
  saliency   sum |a * dL/da| (first-order Taylor importance, Molchanov et al. 2017),
             one backward pass per batch

Activation criteria run `--criteria_batches` training batches through the model
in eval mode with forward hooks on the scored layers; a scored layer that the
model never calls as a module (e.g. a qkv weight applied with F.linear) is an error.
"""
import contextlib
import functools
from typing import Callable, Dict, Iterable, List, Tuple

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
    return {name: _rows(module.weight).abs().sum(1) for name, module in modules.items()}


def _feature_axis_last(output: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] conv maps -> [B*H*W, C]; [B, ..., F] linear outputs -> [*, F]."""
    if output.ndim == 4:
        return output.permute(0, 2, 3, 1).reshape(-1, output.shape[1])
    return output.reshape(-1, output.shape[-1])


@contextlib.contextmanager
def hooked_eval(model: nn.Module, modules: Dict[str, nn.Module], make_hook: Callable[[str], Callable]):
    """`model` in eval mode with the forward hook `make_hook(name)` on each of `modules`; on exit the
    hooks are removed and the model's training mode restored."""
    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


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

    with hooked_eval(model, modules, hook):
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
            model.zero_grad(set_to_none=True)
    if not totals:
        raise ValueError("activation criteria need at least one calibration batch")
    silent = [name for name in modules if name not in totals]
    if silent:
        raise RuntimeError(f"--criteria {kind}: {silent[0]} is never called as a module in the forward pass, "
                           f"so its outputs cannot be scored; use --criteria remain or magnitude")
    return totals


for _kind in ACTIVATION_CRITERIA:
    SCORERS.register(_kind)(functools.partial(activation_scores, _kind))


def uncalled_modules(model: nn.Module, modules: Dict[str, nn.Module], sample: torch.Tensor) -> List[str]:
    """Names of `modules` that one eval forward of `sample` [B, 3, H, W] never calls as modules:
    activation criteria cannot see their outputs (checked before any work starts)."""
    called = set()
    with hooked_eval(model, modules, lambda name: lambda *_: called.add(name)), torch.no_grad():
        model(sample)
    return [name for name in modules if name not in called]


def output_scores(criteria: str, modules: Dict[str, nn.Module], masks: Dict[str, torch.Tensor],
                  model: nn.Module, batches: Callable[[], Iterable]) -> Dict[str, torch.Tensor]:
    """Per-output-feature importance of each named module (higher = more important)."""
    if criteria in WEIGHT_CRITERIA:
        return SCORERS[criteria](modules=modules, masks=masks)
    return SCORERS[criteria](modules=modules, model=model, batches=batches())
