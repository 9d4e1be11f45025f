"""Which compaction code serves a model (a registry of families), masks -> compact model, and
`structured_cost` for the round loop.

A family turns a masked model (weights zero outside their masks) into a JSON-able plan of kept
channels / heads / neurons (`plan`), rebuilds a model's modules to a plan in place (`shrink`, also
used by `load_compact` on a freshly built model before the saved tensors are loaded) and checks a
plan read from arch.json against a model (`check`).
"""
import copy
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torchvision

from compact import resnet, vit
from models.resnet_cifar import CifarResNet
from pruners.masks import Masks
from utils.errors import UsageError
from utils.flops import flops_per_image


@dataclass(frozen=True)
class Family:
    """One kind of model compaction: `plan(masked model, image shape) -> JSON-able plan`, `shrink(model,
    plan) -> model` (in place), `check(plan, model) -> ''` or what does not fit, `accepts(model) -> bool`."""
    name: str
    plan: Callable[[nn.Module, Tuple[int, ...]], dict]  # masked model, one image's shape -> plan
    shrink: Callable[[nn.Module, dict], nn.Module]
    check: Callable[[dict, nn.Module], str]  # '' when the plan fits the model
    accepts: Callable[[nn.Module], bool]


def _is_resnet(model: nn.Module) -> bool:
    if not isinstance(model, (CifarResNet, torchvision.models.ResNet)):
        return False
    try:
        resnet.find_blocks(model)
    except ValueError:
        return False
    return True


def _is_vit(model: nn.Module) -> bool:
    try:
        return bool(vit.attention_modules(model))
    except ValueError:
        return False


FAMILIES: Dict[str, Family] = {
    "resnet": Family("resnet", resnet.plan, resnet.shrink, resnet.check_plan, _is_resnet),
    "vit": Family("vit", vit.plan, vit.shrink, vit.check_plan, _is_vit),
}


def family_of(model: nn.Module) -> Optional[Family]:
    """The family that can compact `model` (a CIFAR / torchvision BasicBlock ResNet, or a timm ViT whose
    attention pruners/groups.py accepts), or None."""
    return next((family for family in FAMILIES.values() if family.accepts(model)), None)


def family_named(name: str, where: str) -> Family:
    if name not in FAMILIES:
        raise UsageError(f"{where}: unknown compaction family {name!r}; choose from {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


@torch.no_grad()
def apply_masks_copy(model: nn.Module, masks: Masks) -> nn.Module:
    """A deep copy of `model` with every masked parameter multiplied by its mask (masks: {param name: 0/1})."""
    masked = copy.deepcopy(model)
    for name, mask in masks.items():
        parameter = masked.get_parameter(name)
        parameter.mul_(mask.to(device=parameter.device, dtype=parameter.dtype))
    return masked


def keep_everything(layout: dict) -> dict:
    """The same plan keeping every channel / head / neuron (element-wise checkpoints: dense-shaped export)."""
    out = {}
    for kind, entries in layout.items():
        out[kind] = {}
        for name, spec in entries.items():
            total = spec.get("out_channels", spec.get("num_heads", spec.get("hidden")))
            out[kind][name] = {key: value for key, value in spec.items() if key not in ("map", "map_input")}
            out[kind][name]["keep"] = list(range(total))
    return out


def compact_copy(masked: nn.Module, family: Family, input_shape: Tuple[int, ...],
                 structured: bool = True, in_place: bool = False) -> Tuple[nn.Module, dict]:
    """(compact model, plan) for a masked model (a copy of it, or `masked` itself when `in_place`);
    `structured` False keeps every width (dense-shaped)."""
    layout = family.plan(masked, input_shape)
    if not structured:
        layout = keep_everything(layout)
    return family.shrink(masked if in_place else copy.deepcopy(masked), layout).eval(), layout


def structured_cost(model: nn.Module, masks: Masks, input_shape: Tuple[int, ...]) -> Dict[str, int]:
    """{"flops_per_image": FLOPs per image (torch.utils.flop_counter: a multiply-add is 2; attention matmuls
    counted on every device), "parameters": parameter count} of `model` with the channels / heads / neurons
    its `masks` leave provably removable taken out: the model as it would run after export_compact.py.

    model: any nn.Module (unchanged); masks {param name: 0/1 tensor}; input_shape one image, e.g. (3, 32, 32).
    Both equal the dense counts for element-wise masks (unless a whole row happens to be pruned: their
    sparsity is remaining_pct's business) and for models no family compacts. About 0.04 s for vit_tiny
    on 2 CPU cores (0.4 s when they are busy).
    """
    masked = apply_masks_copy(model, masks)
    family = family_of(masked)
    if family is not None:
        masked, _ = compact_copy(masked, family, tuple(input_shape), in_place=True)
    return {"flops_per_image": flops_per_image(masked, tuple(input_shape)),
            "parameters": sum(p.numel() for p in masked.parameters())}
