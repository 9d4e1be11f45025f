"""Learned low-rank factorisations vs per-sample truncated SVD, global PCA and a random projection (SPEC §6).

    python compare_svd_nn.py --features cache --results_dir results
See docs/lowrank_compare.md and lowrank/compare.py.
"""
import sys

from lowrank.compare import main

if __name__ == "__main__":
    sys.exit(main())
