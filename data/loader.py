"""Batches from a uint8 image tensor held on the compute device.

Augmentation (random crop with 4-px zero padding + horizontal flip) and
normalisation run on that device, a chunk of batches at a time (a few
kernels per ~8k images instead of per batch, which matters when a training step
is one CUDA-graph replay), so a GPU never waits for a CPU loader and the
dataset is never copied per epoch. Each epoch's order and
augmentation come from a generator seeded by (seed, round, epoch): a resumed
run replays exactly the same batches.
"""
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F

from data import ImageSet

PAD = 4
CHUNK_IMAGES = 8192


def random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random translation by up to PAD pixels (zero fill) and flip."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    offsets = torch.randint(0, 2 * PAD + 1, (2, batch), generator=generator, device=images.device)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = torch.rand(batch, generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


class TensorLoader:
    """An iterable over (normalised float images, labels) batches of an ImageSet.

    `train`: shuffle and augment (seeded by `set_epoch_seed`). `drop_last`: drop a partial last batch
    when there is a full one -- the rule for every loader whose batches a model sees in training mode
    (training, BatchNorm recalibration), so no such batch is smaller than `smallest_batch`.
    """

    def __init__(self, dataset: ImageSet, batch_size: int, mean, std, device: torch.device,
                 train: bool, drop_last: bool = False):
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.batch_size, self.train, self.device = batch_size, train, device
        self.drop_last = drop_last and len(self.labels) >= batch_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.seed = 0

    def __len__(self) -> int:
        full, rest = divmod(len(self.labels), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    @property
    def smallest_batch(self) -> int:
        """Images in the smallest batch an epoch yields (0 for an empty set)."""
        rest = len(self.labels) % self.batch_size
        return min(self.batch_size, len(self.labels)) if self.drop_last or rest == 0 else rest

    def set_epoch_seed(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        count = len(self.labels)
        order = torch.randperm(count, generator=generator, device=self.device) if self.train else None
        end = min(len(self) * self.batch_size, count)
        chunk = self.batch_size * max(1, CHUNK_IMAGES // self.batch_size)
        for chunk_start in range(0, end, chunk):
            index = slice(chunk_start, min(chunk_start + chunk, end))
            chosen = order[index] if order is not None else index
            images, labels = self.images[chosen], self.labels[chosen]
            if self.train:
                images = random_crop_flip(images, generator)
            images = (images.float() - self.mean) / self.std
            for start in range(0, labels.shape[0], self.batch_size):
                yield images[start:start + self.batch_size], labels[start:start + self.batch_size]
