"""Batches from a uint8 image tensor held on the compute device.

Augmentation (random crop with 4-px zero padding + horizontal flip) and
normalisation run on that device, a chunk of batches at a time (a few
kernels per ~8k images instead of per batch, which matters when a training step
is one CUDA-graph replay), so a GPU never waits for a CPU loader and the
dataset is never copied per epoch. Each epoch's order and
augmentation come from a generator seeded by (seed, round, epoch): a resumed
run replays exactly the same batches.

Under torchrun a loader is a shard (rank, ranks): every rank draws the same
global permutation and augmentation parameters, and keeps its slice of each
global batch, so the images a step trains on (and their crops and flips) are
those of a 1-process run whatever the number of ranks.
"""
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F

from data import ImageSet

PAD = 4
CHUNK_IMAGES = 8192


def draw_crop_flip(count: int, generator: torch.Generator, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Augmentation parameters of `count` images: crop offsets int64 [2, count] in [0, 2 * PAD] and
    flips bool [count], drawn in this order from `generator`."""
    offsets = torch.randint(0, 2 * PAD + 1, (2, count), generator=generator, device=device)
    flip = torch.rand(count, generator=generator, device=device) < 0.5
    return offsets, flip


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Translate each image [B, C, H, W] by its offsets [2, B] minus PAD (zero fill), flip where flip [B]."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random translation by up to PAD pixels (zero fill) and flip."""
    return crop_flip(images, *draw_crop_flip(images.shape[0], generator, images.device))


def shard_bounds(count: int, batch_size: int, rank: int, ranks: int) -> List[Tuple[int, int]]:
    """(start, stop) of rank `rank`'s part of each batch of `count` consecutive rows cut in batches of
    `batch_size`: torch.tensor_split's parts (the first `size % ranks` parts one row longer); empty parts
    (a short last evaluation batch) are left out."""
    bounds = []
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        part, longer = divmod(size, ranks)
        low = start + rank * part + min(rank, longer)
        high = low + part + (1 if rank < longer else 0)
        if high > low:
            bounds.append((low, high))
    return bounds


class TensorLoader:
    """An iterable over (normalised float images, labels) batches of an ImageSet.

    `train`: shuffle and augment (seeded by `set_epoch_seed`). `drop_last`: drop a partial last batch
    when there is a full one -- the rule for every loader whose batches a model sees in training mode
    (training, BatchNorm recalibration), so no such batch is smaller than `smallest_batch`.
    `shard` (rank, ranks): yield only part `rank` of `ranks` of each global batch (see shard_bounds);
    `len()` and `batch_size` stay those of the global batches.
    """

    def __init__(self, dataset: ImageSet, batch_size: int, mean, std, device: torch.device,
                 train: bool, drop_last: bool = False, shard: Tuple[int, int] = (0, 1)):
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.batch_size, self.train, self.device = batch_size, train, device
        self.rank, self.ranks = shard  # this process's part of every global batch of `batch_size`
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
            if self.ranks > 1:
                yield from self._shard_of_chunk(order, index, generator)
                continue
            chosen = order[index] if order is not None else index
            images, labels = self.images[chosen], self.labels[chosen]
            if self.train:
                images = random_crop_flip(images, generator)
            images = (images.float() - self.mean) / self.std
            for start in range(0, labels.shape[0], self.batch_size):
                yield images[start:start + self.batch_size], labels[start:start + self.batch_size]

    def _shard_of_chunk(self, order, index: slice, generator: torch.Generator):
        """This rank's part of each batch of the chunk `index`: the chunk's augmentation is drawn whole
        (the generator advances as in one process) and applied to this rank's images only."""
        count = index.stop - index.start
        bounds = shard_bounds(count, self.batch_size, self.rank, self.ranks)
        rows = torch.cat([torch.arange(low, high, device=self.device) for low, high in bounds]) if bounds else \
            torch.zeros(0, dtype=torch.long, device=self.device)
        chosen = (order[index] if order is not None else torch.arange(index.start, index.stop, device=self.device))
        chosen = chosen[rows]
        images, labels = self.images[chosen], self.labels[chosen]
        if self.train:
            offsets, flip = draw_crop_flip(count, generator, self.device)
            images = crop_flip(images, offsets[:, rows], flip[rows])
        images = (images.float() - self.mean) / self.std
        start = 0
        for low, high in bounds:
            yield images[start:start + high - low], labels[start:start + high - low]
            start += high - low
