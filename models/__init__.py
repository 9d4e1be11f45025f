"""Model registry. Models know nothing about pruning.

`create_model(arch, num_classes)` builds a registered CIFAR model, or any timm
model name (built for 32x32 inputs where the model accepts `img_size`).
"""
import torch.nn as nn

from utils.errors import UsageError
from utils.registry import Registry

MODELS: Registry = Registry("architecture", "--arch")

from models import resnet_cifar, vit  # noqa: E402,F401  (registration)


def classifier_of(model: nn.Module) -> nn.Module:
    """The final classification layer (excluded from pruning by default)."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return model.fc


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
