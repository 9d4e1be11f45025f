"""Extract per-image vision features [N tokens, D] into a sharded, resumable feature cache (SPEC §6).

    python extract_features.py --encoder runner:runs/vit/checkpoint.pth.tar --dataset cifar10 --data data --out cache
See docs/lowrank_compare.md and lowrank/extract.py.
"""
import sys

from lowrank.extract import main

if __name__ == "__main__":
    sys.exit(main())
