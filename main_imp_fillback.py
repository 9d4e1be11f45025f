#!/usr/bin/env python
"""Iterative pruning experiment runner: prune -> rewind -> retrain rounds with checkpoint lineage.

    python main_imp_fillback.py --dataset synthetic --arch res20s --struct none \
        --pruning_times 4 --epochs 2 --rate 0.5 --no_wandb

Flags keep the names of the RSST / "Coarsening the Granularity" code; see README.md.
"""
import sys

from utils.cli import main

if __name__ == "__main__":
    sys.exit(main())
