"""Local zero-shot classification sets in clip_benchmark's WebDataset layout.

clip_benchmark (used for the SPEC section 4 evaluation of anchor token pruning)
reads `--dataset wds/<name> --dataset_root DIR` from local tar shards with
`classnames.txt` and `zeroshot_classification_templates.txt`. Each loader
worker reads whole shards, and one without a shard stops the run ("No samples
found"), so sets are written as 16 shards by default (clip_prune.py also caps
`--num_workers` at the shard count). That is the
offline route: its `cifar10` builder goes through torchvision, which verifies
md5 sums of the original pickles and otherwise downloads. The shards are written
with clip_benchmark's own `webdataset_builder.convert_dataset`, so the layout is
the one its reader expects.

    python -m tokens.wds_data --cifar10_npz ../shared/data/cifar10_jpeg.npz --out data/wds_cifar10
    python -m tokens.wds_data --synthetic 20 --out /tmp/tiny_wds --templates 1
"""
import argparse
import io
import json
import math
import os
from typing import List, Sequence, Tuple

import numpy as np

SHARDS = 16  # >= clip_benchmark's default 4 loader workers (and 8, 16): every worker gets whole shards
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar10_templates() -> List[str]:
    """The prompt templates clip_benchmark uses for cifar10 (shipped inside the package)."""
    from clip_benchmark.datasets import builder
    path = os.path.join(os.path.dirname(builder.__file__), "en_zeroshot_classification_templates.json")
    with open(path) as handle:
        return json.load(handle)["cifar10"]


class EncodedImages:
    """(encoded image bytes, label) pairs plus the class names / templates convert_dataset writes out."""

    def __init__(self, samples: Sequence[Tuple[bytes, int]], classes: Sequence[str], templates: Sequence[str]):
        self.samples, self.classes, self.templates = list(samples), list(classes), list(templates)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[bytes, int]:
        return self.samples[index]


def write_wds(out_dir: str, samples: Sequence[Tuple[bytes, int]], classes: Sequence[str], templates: Sequence[str],
              image_format: str, split: str = "test", shards: int = 1) -> str:
    """Write `samples` as about `shards` equal tar shards (at most one per sample) under out_dir/split."""
    from clip_benchmark.webdataset_builder import convert_dataset
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    per_shard = math.ceil(len(samples) / min(shards, max(1, len(samples))))
    convert_dataset(EncodedImages(samples, classes, templates), split, out_dir, transform=None,
                    image_format=image_format, max_count=max(1, per_shard), verbose=False)
    return out_dir


def synthetic_samples(count: int, num_classes: int = 10, size: int = 32, seed: int = 0) -> List[Tuple[bytes, int]]:
    """Random PNG images, one class colour tint each, so labels are not pure noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 256, size=(num_classes, 3))
    samples = []
    for index in range(count):
        label = index % num_classes
        pixels = (0.5 * rng.integers(0, 256, size=(size, size, 3)) + 0.5 * tints[label]).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="png")
        samples.append((buffer.getvalue(), label))
    return samples


def cifar10_npz_samples(path: str, limit: int = 0) -> Tuple[List[Tuple[bytes, int]], List[str]]:
    """Test-split JPEGs of the project's CIFAR-10 bundle, copied byte for byte (no re-encoding)."""
    bundle = np.load(path)
    offsets, labels, test = bundle["offsets"], bundle["labels"], np.flatnonzero(~bundle["is_train"])
    if limit:  # the bundle is sorted by class: spread the subset evenly so every class is in it
        test = test[np.linspace(0, len(test) - 1, limit).astype(int)]
    jpeg = bundle["jpeg"]
    samples = [(jpeg[offsets[i]:offsets[i + 1]].tobytes(), int(labels[i])) for i in test]
    return samples, [str(c) for c in bundle["classes"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cifar10_npz", help="the project's cifar10_jpeg.npz bundle (test split is written)")
    source.add_argument("--synthetic", type=int, help="write this many random images (smoke tests)")
    parser.add_argument("--out", required=True, help="dataset folder; pass it as --dataset_root with --dataset wds/NAME")
    parser.add_argument("--limit", type=int, default=0, help="cifar10_npz: keep only this many test images")
    parser.add_argument("--templates", type=int, default=0, help="keep only the first N prompt templates (0: all 18)")
    parser.add_argument("--shards", type=int, default=SHARDS,
                        help=f"tar shards to write (default {SHARDS}); clip_benchmark's loader workers (--num_workers, "
                             "default 4) each need at least one")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error(f"--shards must be >= 1, got {args.shards}")
    templates = cifar10_templates()[: args.templates or None]
    if args.cifar10_npz:
        samples, classes = cifar10_npz_samples(args.cifar10_npz, args.limit)
        write_wds(args.out, samples, classes, templates, "jpg", shards=args.shards)
    else:
        write_wds(args.out, synthetic_samples(args.synthetic), CIFAR10_CLASSES, templates, "png", shards=args.shards)
    print(f"wrote {args.out}: use --dataset wds/cifar10 --dataset_root {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
