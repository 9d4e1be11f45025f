"""What compaction starts from: a round checkpoint of the runner, its masked model, and test images.

The masked model is the checkpoint's model with its masks multiplied in: what the runner evaluates
(checkpoints already hold zeros outside their masks; multiplying again changes nothing).
"""
import os
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn

import data
from compact.families import apply_masks_copy
from models import create_model
from utils import checkpoint
from utils.errors import CheckpointError, UsageError

STRUCTURED = ("refill", "rsst")  # channel masks, or heads + neurons with --vit_structured
ELEMENTWISE = ("none", "regroup")  # element-wise (or block) masks: nothing to remove
VERIFY_IMAGES = 256


@dataclass
class Source:
    path: str
    payload: dict
    config: dict
    round: int
    num_classes: int
    dense: nn.Module  # the arch with the checkpoint's weights and no masks
    masked: nn.Module  # the checkpoint as the runner evaluates it
    structured: bool


def load_source(path: str) -> Source:
    """Load and check a numbered round checkpoint or <k>model_best.pth.tar (CheckpointError / UsageError,
    one line naming `path`, for anything else)."""
    payload = checkpoint.load(path)
    if payload["kind"] != "round":
        raise CheckpointError(f"{path}: an epoch-level ({payload['kind']}) checkpoint of an unfinished round; "
                              f"compact a numbered <k>checkpoint.pth.tar or <k>model_best.pth.tar")
    config = payload["config"]
    struct = config.get("struct")
    if struct not in STRUCTURED + ELEMENTWISE:
        raise UsageError(f"{path}: made by --struct {struct}, which changes tokens or layers rather than masking "
                         f"weights; compaction reads --struct {', '.join(STRUCTURED + ELEMENTWISE)} checkpoints")
    num_classes = data.DATASETS[config["dataset"]].num_classes
    dense = create_model(config["arch"], num_classes)
    try:
        dense.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its weights do not fit --arch {config['arch']} "
                              f"({str(exc).splitlines()[0][:160]})") from None
    dense.eval()
    masked = apply_masks_copy(dense, payload["masks"]).eval()
    return Source(path=path, payload=payload, config=config, round=int(payload["round"]),
                  num_classes=num_classes, dense=dense,
                  masked=masked, structured=struct in STRUCTURED)


def verification_images(config: dict, data_root: str = None) -> Tuple[torch.Tensor, str]:
    """(VERIFY_IMAGES normalised fp32 test images [N, 3, H, W], where they came from). The checkpoint's
    dataset under `data_root` (default: its config's --data); random images of the same shape when the
    files are not there (the returned text says so)."""
    name, root = config["dataset"], data_root or config.get("data") or "data"
    spec = data.DATASETS[name]
    try:
        _, test = spec.read(root)
    except UsageError as exc:
        generator = torch.Generator().manual_seed(0)
        return (torch.randn((VERIFY_IMAGES, 3, 32, 32), generator=generator),
                f"random images (the {name} test set could not be read: {exc})")
    images = test.images[:VERIFY_IMAGES].float()
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    where = f"the first {len(images)} {name} test images" + (f" ({os.path.abspath(root)})" if name != "synthetic"
                                                              else "")
    return (images - mean) / std, where


@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, images: torch.Tensor) -> float:
    """max |a(x) - b(x)| over `images`, both models eval-mode fp32 on the CPU (deterministic kernels)."""
    return float((a.float().cpu().eval()(images) - b.float().cpu().eval()(images)).abs().max())
