"""`extract_features.py`: run a vision encoder over a dataset into a resumable feature cache.

    python extract_features.py --encoder runner:runs/vit/checkpoint.pth.tar --dataset cifar10 --data data --out cache
    python extract_features.py --encoder vit_tiny_patch16_224 --dataset folder --data photos/ --out cache --limit 500

Images come from a dataset of the runner's registry (cifar10, cifar100, synthetic; --split train or test)
or from an image folder (--dataset folder --data PATH: every .jpg/.jpeg/.png/.bmp/.webp under PATH,
sorted by path). A rerun with the same flags skips the done shards; a cache of another encoder or
dataset in --out is refused (exit 2).
"""
import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from lowrank.cache import DTYPES, resume_point, write_cache
from lowrank.encoders import Encoder, build_encoder
from utils.errors import UsageError, run_cli

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImageSource:
    """`count` images; `read(start, stop)` returns uint8 [stop - start, 3, H, W]."""
    count: int
    read: Callable[[int, int], torch.Tensor]
    description: dict


def registry_source(name: str, root: str, split: str) -> ImageSource:
    from data import DATASETS
    train, test = DATASETS[name].read(root)
    images = (train if split == "train" else test).images
    return ImageSource(len(images), lambda start, stop: images[start:stop],
                       {"dataset": name, "split": split})


def folder_source(root: str, size: int) -> ImageSource:
    """Every image file under `root`, converted to RGB and resized to size x size (bilinear)."""
    from PIL import Image
    if not os.path.isdir(root):
        raise UsageError(f"--data {root}: no such image folder")
    files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
                   if name.lower().endswith(IMAGE_SUFFIXES))

    def read(start: int, stop: int) -> torch.Tensor:
        tensors = []
        for path in files[start:stop]:
            try:
                with Image.open(path) as image:
                    pixels = image.convert("RGB").resize((size, size), Image.BILINEAR)
            except OSError as exc:
                raise UsageError(f"{path}: unreadable image ({exc})") from None
            tensors.append(torch.frombuffer(bytearray(pixels.tobytes()), dtype=torch.uint8).view(size, size, 3))
        return torch.stack(tensors).permute(0, 3, 1, 2).contiguous()
    return ImageSource(len(files), read, {"dataset": "folder", "data": os.path.abspath(root), "files": len(files)})


def features_of(source: ImageSource, encoder: Encoder, start: int, stop: int, batch_size: int,
                progress: bool = True) -> Iterator[torch.Tensor]:
    """Per-image features [N, D] of images start..stop-1, encoded in batches, with a progress bar."""
    from tqdm import tqdm
    with tqdm(total=stop, initial=start, unit="img", desc="extract", disable=not progress) as bar:
        for begin in range(start, stop, batch_size):
            end = min(stop, begin + batch_size)
            yield from encoder.encode(source.read(begin, end)).cpu()
            bar.update(end - begin)


def extract(source: ImageSource, encoder: Encoder, out: str, batch_size: int = 64, shard_size: int = 256,
            dtype: torch.dtype = torch.float16, limit: Optional[int] = None, progress: bool = True) -> dict:
    """Encode the first `limit` (default all) images of `source` into the cache `out`; returns its index.
    Resumes after the last done shard. Raises UsageError for a cache of another encoder or dataset in `out`."""
    count = source.count if limit is None else min(limit, source.count)
    if count == 0:
        raise UsageError(f"--dataset {source.description['dataset']}: no images to encode")
    config = {**encoder.config, **source.description, "count": count}
    try:
        start = resume_point(out, encoder.name, config, shard_size, dtype)
    except ValueError as exc:
        raise UsageError(f"--out {exc}") from None
    if start and progress:
        print(f"resuming {out} at image {start} of {count}", file=sys.stderr)
    return write_cache(out, encoder.name, config, features_of(source, encoder, start, count, batch_size, progress),
                       shard_size=shard_size, dtype=dtype, start=start, total=count)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Extract per-image vision features [N, D] into a feature cache")
    parser.add_argument("--encoder", required=True, help="timm model name, runner:CHECKPOINT or hf:PATH")
    parser.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, synthetic or folder")
    parser.add_argument("--data", default="data", help="dataset root (cifar-10-batches-py) or the image folder")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="registry datasets only")
    parser.add_argument("--out", required=True, help="cache directory (created; resumed when it exists)")
    parser.add_argument("--limit", type=int, default=None, help="encode only the first LIMIT images")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--shard_size", type=int, default=256, help="samples per safetensors shard")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="stored dtype")
    parser.add_argument("--pretrained", action="store_true", help="timm: load pretrained weights (must be local)")
    parser.add_argument("--img_size", type=int, default=None, help="encoder input side (default: its own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry: 0 done, 2 bad input (one line)."""
    args = parse_args(argv)

    def report(index: dict) -> None:
        print(f"{args.out}: {index['count']} features of shape {index['shape']} ({index['dtype']}) "
              f"from {index['encoder']} in {len(index['shards'])} shards")

    return run_cli(lambda: extract_from_args(args), report)


def extract_from_args(args: argparse.Namespace) -> dict:
    """The written cache's index for parsed flags; UsageError naming the flag for bad input."""
    for flag in ("limit", "batch_size", "shard_size", "img_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} {value}: must be at least 1")
    if args.dataset == "folder" and not os.path.isdir(args.data):
        raise UsageError(f"--data {args.data}: no such image folder")
    encoder = build_encoder(args.encoder, args.pretrained, args.img_size, args.device)
    source = (folder_source(args.data, encoder.image_size) if args.dataset == "folder"
              else registry_source(args.dataset, args.data, args.split))
    return extract(source, encoder, args.out, args.batch_size, args.shard_size, DTYPES[args.dtype], args.limit,
                   not args.no_progress)
