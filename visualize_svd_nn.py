"""Maps of one cached sample's first 8 channels over its token grid: original, SVD and learned, and errors.

    python visualize_svd_nn.py --features cache --results_dir results --image_idx 3
See docs/lowrank_compare.md and lowrank/visualize.py.
"""
import sys

from lowrank.visualize import main

if __name__ == "__main__":
    sys.exit(main())
