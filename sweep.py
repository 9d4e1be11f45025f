#!/usr/bin/env python
"""Run a grid of main_imp_fillback.py experiments, resumably (docs/sweep.md).

    python sweep.py --grid criteria=remain,magnitude,l1 --grid rate=0.2,0.3 --grid seed=1,2 \
        --name crit --executor local --parallel 2 -- --arch vit_tiny --struct rsst --vit_structured

Finished cells are skipped, interrupted ones resumed; the executors: local (a process pool, one GPU
a cell), slurm (a submitit job array, requeued on preemption) and submitit_local.
"""
import sys

from sweeps.cli import main

if __name__ == "__main__":
    sys.exit(main())
