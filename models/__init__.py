"""Model registry. Models know nothing about pruning.

`create_model(arch, num_classes)` builds a registered CIFAR model, or any timm
model name (built for 32x32 inputs where the model accepts `img_size`).
"""
from typing import Iterable, List

import torch.nn as nn

from utils.errors import UsageError
from utils.registry import Registry

MODELS: Registry = Registry("architecture", "--arch")

from models import resnet_cifar, vit  # noqa: E402,F401  (registration)


def _named(model: nn.Module, names: Iterable[str]) -> List[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[name] for name in names if name in modules]


def classifier_modules(model: nn.Module) -> List[nn.Module]:
    """Every classification head of `model` (kept dense unless --fc).

    timm's `get_classifier()` returns one module, or a tuple for distilled ViTs
    (`head`, `head_dist`); a head may also be a container (ConvNeXt's `head.fc`
    is inside `head`). Returns the modules as given, in order; raises UsageError
    when the model has neither `get_classifier()` nor an `fc` layer.
    """
    if hasattr(model, "get_classifier"):
        heads = model.get_classifier()
        heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
    elif isinstance(getattr(model, "fc", None), nn.Module):
        heads = [model.fc]
    else:
        raise UsageError(f"{type(model).__name__}: no classifier found (neither get_classifier() nor fc)")
    return [head for head in heads if isinstance(head, nn.Module) and not isinstance(head, nn.Identity)]


def stem_modules(model: nn.Module) -> List[nn.Module]:
    """The stem: the first convolution that sees the image (kept dense unless --conv1).

    timm models name it in `pretrained_cfg["first_conv"]` (`conv1` for ResNets,
    `conv1.0` for deep-stem ones, `patch_embed.proj` for ViTs, `stem.0` for ConvNeXt);
    our CIFAR models call it `conv1`, our ViTs `patch_embed.proj`. Empty when none is found.
    """
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if first:
        return _named(model, [first] if isinstance(first, str) else first)
    return _named(model, ["patch_embed.proj"]) or _named(model, ["conv1"])


def dense_modules(model: nn.Module, prune_stem: bool = False, prune_classifier: bool = False) -> List[nn.Module]:
    """Modules left out of pruning: the stem unless `prune_stem` (--conv1), every
    classifier head unless `prune_classifier` (--fc / --prune_classifier)."""
    return ([] if prune_stem else stem_modules(model)) + ([] if prune_classifier else classifier_modules(model))


def is_known_arch(arch: str) -> bool:
    if arch in MODELS:
        return True
    import timm
    return timm.is_model(arch)


def create_model(arch: str, num_classes: int) -> nn.Module:
    if arch in MODELS:
        return MODELS[arch](num_classes)
    import timm
    if not timm.is_model(arch):
        MODELS[arch]  # raises the error listing our names
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=32)
    except TypeError:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except Exception as exc:
        raise UsageError(f"--arch {arch}: timm could not build it for 32x32 inputs ({exc})") from None
