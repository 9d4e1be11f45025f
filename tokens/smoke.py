"""A tiny random-weight CLIP and a tiny local dataset, for smoke runs of anchor token pruning.

No weights or data can be downloaded in CI, so `prune_test.sh` and the tests
evaluate (SPEC section 4) an open_clip model given as `local-dir:<folder>`: a
folder holding only `open_clip_config.json` makes open_clip build the
architecture with random weights. Its ViT has 65 tokens (64 px, patch 8,
CLS + 8x8 patches), 3 blocks, width 64; the text tower is as small.

    python -m tokens.smoke --out /tmp/smoke   # -> /tmp/smoke/model, /tmp/smoke/data
"""
import argparse
import json
import os

from tokens.wds_data import CIFAR10_CLASSES, cifar10_templates, synthetic_samples, write_wds

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_model(folder: str) -> str:
    """Returns the open_clip model name to pass as --model."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as handle:
        json.dump({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}, handle, indent=1)
    return f"local-dir:{os.path.abspath(folder)}"


def write_tiny_data(folder: str, images: int = 20, templates: int = 1) -> str:
    """Returns the folder to pass as --dataset_root (with --dataset wds/cifar10)."""
    return write_wds(folder, synthetic_samples(images), CIFAR10_CLASSES, cifar10_templates()[:templates], "png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="write a tiny random CLIP config and a tiny wds dataset")
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args(argv)
    model = write_tiny_model(os.path.join(args.out, "model"))
    data = write_tiny_data(os.path.join(args.out, "data"), args.images)
    print(f"--model {model} --pretrained '' --dataset wds/cifar10 --dataset_root {data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
