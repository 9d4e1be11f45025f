"""Learn a low-rank factorisation X [N, D] ~ A [N, r] B [r, D] of cached vision features (ResMLP / MLP /
AdaLoRA with peft's RankAllocator). Flags and outputs: docs/lowrank.md.

    python train_lowrank.py --arch ResMLP --features CACHE --epochs 100 --rank 128 --results_dir results
"""
import sys

from lowrank.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
