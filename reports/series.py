"""Seeds of one experiment as one series: mean and spread per round.

Two runs are seeds of one experiment when their config.json "config" dicts are equal once
NON_EXPERIMENT_KEYS are dropped (the seed itself, and every run-control field of
utils.config.RUN_CONTROL_FIELDS: where a run writes, resume flags, logging/wandb, device and speed
settings, pruning_times, which only says how far a run got) and they start from the same place (a
fresh start, or the same round of parents that are themselves seeds of one experiment). Runs that
are not distinct replicas (the same seed from the same parent: a re-run, a copy) are never averaged:
each stays its own series.
"""
import json
import os
import statistics
from dataclasses import dataclass
from typing import Optional

from reports.lineage import branch_points
from utils.config import RUN_CONTROL_FIELDS

NON_EXPERIMENT_KEYS = frozenset(RUN_CONTROL_FIELDS | {"seed"})
SPREADS = ("std", "range")  # --spread: sample standard deviation, or min-max


def is_experiment_key(key: str) -> bool:
    """Keys that make two runs different experiments (not seed, paths, resume, wandb_*, speed settings)."""
    return key not in NON_EXPERIMENT_KEYS and not key.startswith("wandb")


@dataclass(frozen=True)
class Stat:
    """mean and its band [lo, hi] over n runs: mean ± sample std, or min-max (`spread`)."""
    mean: float
    lo: float
    hi: float
    n: int
    spread: str

    def text(self, digits: int = 2) -> str:
        """'71.25' for one run (or equal values); '71.25 ± 0.50' (std) or '71.25 [70.75, 71.75]' (range)."""
        mean = f"{self.mean:.{digits}f}"
        if self.n < 2 or self.lo == self.hi:  # one run, or seeds that agree (e.g. remaining %)
            return mean
        if self.spread == "std":
            return f"{mean} ± {self.hi - self.mean:.{digits}f}"
        return f"{mean} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def stat(values: list, spread: str = "std") -> Optional[Stat]:
    """Stat of the non-None `values` (None when there are none). Raises ValueError for an unknown spread."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    mean = statistics.fmean(values)
    if spread == "range":
        return Stat(mean, min(values), max(values), len(values), spread)
    half = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stat(mean, mean - half, mean + half, len(values), spread)


@dataclass
class SeriesRow:
    """One round of a series; every number a Stat over the seeds that finished the round."""
    round: int
    n: int
    remaining_pct: Stat
    test_top1: Stat
    val_top1: Optional[Stat]
    epochs: Optional[int]
    tokens_kept: Optional[Stat]
    flops_per_image: Optional[Stat]
    throughput: Optional[Stat]          # img/s at batch 256 (median of each seed's export)
    throughput_settings: tuple = ()     # how the seeds' throughput was measured, sorted: ('fp32',), ('bf16, compiled',)
    masked_throughput: Optional[Stat] = None  # the masked model's img/s beside a compact one (the speedup's base)


@dataclass(eq=False)
class Series:
    label: str
    runs: list                          # the seeds (Run), at least one
    rows: list                          # SeriesRow by round
    parent: Optional["Series"] = None   # the series the first run branched from, when in the report
    branch_round: Optional[int] = None

    @property
    def control(self) -> Optional[str]:
        return self.runs[0].control

    @property
    def is_token(self) -> bool:
        return self.runs[0].is_token

    @property
    def config(self) -> dict:
        return self.runs[0].config

    @property
    def seeds(self) -> list:
        return [run.config.get("seed") for run in self.runs]

    def best(self) -> Optional[SeriesRow]:
        """The round with the best mean validation top-1, ties to the sparser round (as Run.best)."""
        rows = [r for r in self.rows if r.val_top1 is not None]
        return max(rows, key=lambda r: (r.val_top1.mean, -r.remaining_pct.mean,
                                        -(r.tokens_kept.mean if r.tokens_kept else 0)), default=None)


def _series_rows(runs: list, spread: str) -> list:
    rows = []
    for index in sorted({r.round for run in runs for r in run.rounds}):
        done = [r for run in runs for r in run.rounds if r.round == index]
        epochs, speeds = {r.epochs for r in done}, [r.throughput for r in done if r.throughput]
        rows.append(SeriesRow(
            index, len(done), stat([r.remaining_pct for r in done], spread), stat([r.test_top1 for r in done], spread),
            stat([r.val_top1 for r in done], spread), epochs.pop() if len(epochs) == 1 else None,
            stat([r.tokens_kept for r in done], spread), stat([r.flops_per_image for r in done], spread),
            stat([speed.median for speed in speeds], spread), tuple(sorted({speed.setting for speed in speeds})),
            stat([speed.masked_median for speed in speeds], spread)))
    return rows


def make_series(label: str, runs: list, spread: str = "std") -> Series:
    """A series of the given runs (e.g. a sweep's seeds of one grid row), whatever their configs say."""
    return Series(label, runs, _series_rows(runs, spread), branch_round=runs[0].branch_round)


def experiment_keys(runs: list) -> dict:
    """{run: canonical text} equal exactly for seeds of one experiment (see the module docstring)."""
    points, keys = branch_points(runs), {}

    def key(run) -> str:
        if run not in keys:
            keys[run] = ""  # a (corrupt) cycle of branches ends here instead of recursing forever
            parent, at = points.get(run, (None, None))
            start = (key(parent), at) if parent else (["elsewhere", run.branch_round] if run.origin else None)
            config = {k: v for k, v in run.config.items() if is_experiment_key(k)} if run.config else run.directory
            keys[run] = json.dumps([config, start], sort_keys=True, default=str)
        return keys[run]

    for run in runs:
        key(run)
    return keys


def group_series(runs: list, spread: str = "std") -> list:
    """Series in the order of their first run: seeds of one experiment merged, every other run alone."""
    keys, groups = experiment_keys(runs), {}
    for run in runs:
        groups.setdefault(keys[run], []).append(run)
    members = []
    for same in groups.values():
        # a replica is its seed and, for a branch, its parent: controls of two ticket seeds may share --seed
        seeds = [run.config.get("seed") for run in same]
        replicas = {(str(run.config.get("seed")), os.path.dirname(run.origin or "")) for run in same}
        distinct = None not in seeds and len(replicas) == len(same)
        members += [same] if len(same) > 1 and distinct else [[run] for run in same]
    series, used = [], set()
    for group in members:
        label = group[0].label if len(group) == 1 else f"{group[0].base} ({len(group)} seeds)"
        if label in used and group[0].branch_round is not None:
            label = f"{label} from round {group[0].branch_round}"
        used.add(label)
        series.append(make_series(label, group, spread))
    of_run = {run: s for s in series for run in s.runs}
    points = branch_points(runs)
    for s in series:
        parent = points.get(s.runs[0], (None, None))[0]
        s.parent = of_run.get(parent)
    return series
