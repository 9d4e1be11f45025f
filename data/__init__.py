"""Datasets as uint8 tensors; no model knowledge.

`load(name, root, val_size)` returns train / val / test splits. The validation
split is held out of the training set (the last `val_size` training images) and
is what model selection uses; the test set is only reported.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from utils.errors import UsageError
from utils.registry import Registry


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    default_val_size: int
    read: Callable[[str], Tuple[ImageSet, ImageSet]]  # root -> (train, test); UsageError when unavailable


@dataclass(frozen=True)
class DataSplits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    spec: DatasetSpec


DATASETS: Registry = Registry("dataset", "--dataset")

from data import cifar, synthetic  # noqa: E402,F401  (registration)


def resolve_val_size(name: str, val_size: Optional[int]) -> int:
    return DATASETS[name].default_val_size if val_size is None else val_size


def load(name: str, root: str, val_size: Optional[int] = None) -> DataSplits:
    spec = DATASETS[name]
    train, test = spec.read(root)
    held_out = resolve_val_size(name, val_size)
    if not 0 <= held_out < len(train):
        raise UsageError(f"--val_size {held_out}: must be between 0 and {len(train) - 1} "
                         f"(the {name} training set has {len(train)} images)")
    cut = len(train) - held_out
    return DataSplits(train=ImageSet(train.images[:cut], train.labels[:cut]),
                      val=ImageSet(train.images[cut:], train.labels[cut:]), test=test, spec=spec)
