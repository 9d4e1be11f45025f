"""A built-in CIFAR-shaped dataset for demos and tests, generated, never downloaded.

Each of 10 classes has a smooth random colour template (a 4x4 pattern
upsampled to 32x32); an image is its class template, randomly shifted and
brightness-scaled, plus pixel noise. It is learnable (a small CNN rises well
above chance within an epoch) yet not trivial, and identical on every machine.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from data import DATASETS, DatasetSpec, ImageSet

NUM_CLASSES = 10
TRAIN_SIZE = 3000
TEST_SIZE = 1000
DATA_SEED = 20241123


def _templates(generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(NUM_CLASSES, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def _draw(templates: torch.Tensor, count: int, generator: torch.Generator) -> ImageSet:
    labels = torch.arange(count) % NUM_CLASSES
    labels = labels[torch.randperm(count, generator=generator)]
    images = templates[labels]
    shifts = torch.randint(-3, 4, (count, 2), generator=generator)
    rows = (torch.arange(32)[None, :] - shifts[:, :1]) % 32  # a cyclic shift per image, as torch.roll
    cols = (torch.arange(32)[None, :] - shifts[:, 1:]) % 32
    images = images[torch.arange(count)[:, None, None, None], torch.arange(3)[None, :, None, None],
                    rows[:, None, :, None], cols[:, None, None, :]]
    brightness = 0.7 + 0.6 * torch.rand(count, 1, 1, 1, generator=generator)
    noise = 0.25 * torch.randn(images.shape, generator=generator)
    pixels = (images * brightness + noise).clamp(0, 1)
    return ImageSet((pixels * 255).round().to(torch.uint8), labels.to(torch.int64))


def read_synthetic(_root: str) -> Tuple[ImageSet, ImageSet]:
    generator = torch.Generator().manual_seed(DATA_SEED)
    templates = _templates(generator)
    return _draw(templates, TRAIN_SIZE, generator), _draw(templates, TEST_SIZE, generator)


DATASETS.register("synthetic")(DatasetSpec(
    num_classes=NUM_CLASSES, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    default_val_size=TRAIN_SIZE // 10, read=read_synthetic))
