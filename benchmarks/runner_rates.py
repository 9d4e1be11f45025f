"""Training images/s of the runner itself: one plain run against the cells of a `--fused_grid` run, each read from
its last epoch record in metrics.jsonl (`images_per_second`: the epoch's training images over its training time).

    python -m benchmarks.runner_rates --plain runs/plain --fused runs/fused --out runner.json
"""
import argparse
import os
import sys
from typing import Dict, List

from benchmarks.output import save
from utils import paths
from utils.errors import UsageError, run_cli
from utils.tracking import read_records


def run_dirs(folder: str) -> List[str]:
    """Names of the run dirs in `folder` (sub-folders holding a metrics.jsonl), sorted; [] when it is no folder."""
    if not os.path.isdir(folder):
        return []
    return sorted(d for d in os.listdir(folder) if os.path.isfile(paths.metrics_file(os.path.join(folder, d))))


def epoch_records(run_dir: str) -> List[dict]:
    """The epoch records of `run_dir`'s metrics.jsonl (utils.tracking.read_records: a torn last line is left out);
    UsageError naming the file when it is missing or holds no epoch record."""
    path = paths.metrics_file(run_dir)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file (did the run train?)")
    records = [r for r in read_records(run_dir) if r.get("type") == "epoch"]
    if not records:
        raise UsageError(f"{path}: no epoch record")
    return records


def last_epoch_rate(run_dir: str) -> float:
    """images_per_second of the last epoch record of `run_dir`/metrics.jsonl; UsageError naming the file when
    it is missing or has no epoch record."""
    rates = [r["images_per_second"] for r in epoch_records(run_dir) if "images_per_second" in r]
    if not rates:
        raise UsageError(f"{paths.metrics_file(run_dir)}: no epoch record")
    return rates[-1]


def runner_summary(plain_dir: str, fused_dir: str) -> Dict[str, object]:
    """{plain_images_per_second, cells_images_per_second: {cell: img/s}, fused_images_per_second (their sum),
    fused_over_plain}; the cells are the run dirs under `fused_dir` (UsageError when there is none)."""
    plain = last_epoch_rate(plain_dir)
    names = run_dirs(fused_dir)
    if not names:
        raise UsageError(f"{fused_dir}: no cell run dir (metrics.jsonl) in it")
    cells = {name: last_epoch_rate(os.path.join(fused_dir, name)) for name in names}
    total = sum(cells.values())
    return {"plain_images_per_second": plain, "cells_images_per_second": cells, "fused_images_per_second": total,
            "fused_over_plain": total / plain}


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plain", required=True, help="the plain run's dir")
    p.add_argument("--fused", required=True, help="the --fused_grid run's dir (one run dir per cell in it)")
    p.add_argument("--out", required=True, help="JSON results file")
    args = p.parse_args(argv)
    summary = runner_summary(args.plain, args.fused)
    cells = summary["cells_images_per_second"]
    print(f"runner: one run {summary['plain_images_per_second']:,.0f} img/s, {len(cells)} fused cells "
          f"{summary['fused_images_per_second']:,.0f} img/s ({summary['fused_over_plain']:.2f}x), last epoch")
    return save(summary, args.out, indent=1)


def main(argv=None) -> int:
    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
