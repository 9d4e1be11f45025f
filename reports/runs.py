"""Run dirs as data: the rounds a run finished, its config, its measured exports, its parent.

Only the plain-text artifacts a run writes are read (config.json, lineage.json, metrics.jsonl and
export_compact.py's compact/round_<k>.json), never the checkpoints, so a report is cheap and works
on run dirs copied off a cluster. Readers tolerate missing or half-written files: a run that crashed
mid-write still reports the rounds it finished.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from reports.lineage import CONTROL_KINDS, branch_points, compact_rounds, norm_path, walk_tree
from utils import paths
from utils.errors import UsageError
from utils.jsonfile import read_json

THROUGHPUT_VARIANTS = ("compact", "masked")  # the model one would deploy: compact if exported, else masked


@dataclass(frozen=True)
class Throughput:
    """Measured images/s at batch 256 (export_compact.py: median and quartiles over repeats)."""
    median: float
    p25: float
    p75: float
    variant: str                        # "compact" or "masked"
    device: str
    dtype: str = "?"                    # export_compact.py --dtype: "fp32" or "bf16" ("?" in exports without it)
    compiled: bool = False              # export_compact.py --compile: timed as torch.compile'd models
    masked_median: Optional[float] = None  # the masked variant's img/s of the same export when `variant` is
    #                                        compact: the baseline of the compact model's speedup

    @property
    def setting(self) -> str:
        """How it was measured: 'fp32', 'bf16, compiled'. img/s of two settings are not comparable."""
        return self.dtype + (", compiled" if self.compiled else "")


@dataclass
class RoundRow:
    round: int
    remaining_pct: float                # % of the prunable weights left (100 for every --struct token round)
    test_top1: float
    val_top1: Optional[float] = None    # best validation top-1 of the round; None without a validation split
    epochs: Optional[int] = None
    tokens_kept: Optional[int] = None   # --struct token: tokens per image (prefix + patch) from the start block on
    flops_per_image: Optional[int] = None  # the round record's FLOPs of one forward pass (absent in old runs)
    throughput: Optional[Throughput] = None  # from compact/round_<k>.json when the round was exported


@dataclass(eq=False)  # identity equality: runs are dict keys in the lineage tree
class Run:
    directory: str
    label: str                          # unique in a report: base + what tells equal bases apart
    rounds: list                        # RoundRow, sorted by round
    origin: Optional[str] = None        # parent file of the first round when it lies in another run dir
    recorded_dir: Optional[str] = None  # run_dir as written in lineage.json: where the run was made
    config: dict = field(default_factory=dict)  # config.json's "config" ({} when absent)
    base: str = ""                      # the label before disambiguation (seeds of one experiment share it)

    @property
    def is_token(self) -> bool:
        """A --struct token run: its rounds shrink the tokens, so its x is tokens kept, not weights."""
        return any(r.tokens_kept is not None for r in self.rounds)

    @property
    def control(self) -> Optional[str]:
        """The lottery-ticket control kind (random_reinit, random_prune, retrain) or None for a ticket."""
        kind = self.config.get("branch")
        return kind if kind in CONTROL_KINDS else None

    @property
    def branch_round(self) -> Optional[int]:
        """The parent round this run started from, when it is a branch of a numbered checkpoint."""
        return paths.round_index_of(self.origin) if self.origin else None

    def best(self) -> Optional[RoundRow]:
        """The round with the best *validation* top-1 (never selected on test: its test top-1 is only
        reported beside it); None when no round has a validation split (--val_size 0). Ties go to the
        sparser round (fewer weights, or fewer tokens): the same accuracy with less is the better ticket."""
        rounds = [r for r in self.rounds if r.val_top1 is not None]
        return max(rounds, key=lambda r: (r.val_top1, -r.remaining_pct, -(r.tokens_kept or 0)), default=None)

    def size(self, row: RoundRow) -> str:
        """How much of the model a round keeps, in this run's unit: '50%' or '33 tokens'."""
        return f"{row.tokens_kept} tokens" if self.is_token else f"{row.remaining_pct:.3g}%"

    def names(self) -> set:
        """Every path this run dir may be known by: as given, resolved, and where it was made."""
        recorded = {norm_path(self.recorded_dir)} if self.recorded_dir else set()
        return {norm_path(self.directory), os.path.realpath(self.directory)} | recorded


# ---- reading -----------------------------------------------------------------------------------
RUN_FILES = (paths.config_file, paths.lineage_file, paths.metrics_file)


def is_run_dir(directory: str) -> bool:
    """A folder the runner wrote into: it has config.json, lineage.json or metrics.jsonl."""
    return any(os.path.isfile(name(directory)) for name in RUN_FILES)


def run_dirs_under(folder: str) -> list:
    """Run dirs below `folder`, sorted; a run dir's own subfolders (e.g. wandb/) are not searched."""
    found = []
    for here, subdirs, _ in os.walk(folder):
        if is_run_dir(here):
            found.append(here)
            subdirs.clear()
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return sorted(found)


def read_metrics(path: str) -> tuple:
    """(records, number of skipped lines): a line cut short by a crash is skipped, not fatal."""
    records, skipped = [], 0
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in filter(str.strip, f):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if isinstance(record, dict):
                    records.append(record)
                else:
                    skipped += 1
    return records, skipped


def read_json_or_warn(path: str, what: str, warnings: list) -> dict:
    """The JSON object in `path` (a `what`, for utils.jsonfile.read_json); {} when absent, and {} plus the
    reader's one line (`..., ignored`) in `warnings` when it is unreadable or not an object."""
    if not os.path.exists(path):
        return {}
    try:
        return read_json(path, what, UsageError)
    except UsageError as exc:
        warnings.append(f"{exc}, ignored")
        return {}


def _optional(value, kind):
    return None if value is None else kind(value)


def _row(entry: dict) -> Optional[RoundRow]:
    try:
        return RoundRow(int(entry["round"]), float(entry["remaining_pct"]), float(entry["test_top1"]),
                        _optional(entry.get("val_top1"), float), _optional(entry.get("epochs"), int),
                        _optional(entry.get("tokens_kept"), int), _optional(entry.get("flops_per_image"), int))
    except (KeyError, TypeError, ValueError):
        return None  # a record missing its numbers has nothing to plot


def _median_img_s(variants, variant: str) -> float:
    """variants[variant]'s batch-256 img/s median; KeyError/TypeError/ValueError when it has none."""
    return float(variants[variant]["throughput_img_s_b256"]["median"])


def read_throughput(directory: str, round_index: int, warnings: list) -> Optional[Throughput]:
    """The deployable variant's batch-256 throughput from compact/round_<k>.json, or None (not exported);
    with the export's dtype and compile setting and, beside a compact variant, the masked one's median."""
    path = paths.compact_round_report(directory, round_index)
    export = read_json_or_warn(path, "compact round report", warnings)
    variants = export.get("variants")
    for variant in THROUGHPUT_VARIANTS:
        try:
            speed = variants[variant]["throughput_img_s_b256"]
            median, p25, p75 = float(speed["median"]), float(speed["p25"]), float(speed["p75"])
        except (KeyError, TypeError, ValueError):
            continue
        try:
            masked = _median_img_s(variants, "masked") if variant != "masked" else None
        except (KeyError, TypeError, ValueError):
            masked = None  # an export without a masked variant: no speedup to show
        return Throughput(median, p25, p75, variant, str(export.get("device", "?")),
                          str(export.get("dtype") or "?"), export.get("compile") is True, masked)
    if variants is not None:
        warnings.append(f"{path}: no throughput_img_s_b256 of a compact or masked variant, ignored")
    return None


def run_label(config: dict, fallback: str) -> str:
    """A readable name from the flags that tell experiments apart."""
    if not config:
        return fallback
    parts = [f"{config.get('struct', '?')}{'+head' if config.get('vit_structured') else ''}",
             config.get("arch", "?"), config.get("dataset", "?"), f"rate={config.get('rate', '?')}",
             *([f"crit={config['criteria']}"] if config.get("struct") in ("refill", "rsst") else []),
             *([f"[{config['exp_name']}]"] if config.get("exp_name") else [])]
    return " ".join(str(part) for part in parts)


def read_run(directory: str, warnings: list) -> Run:
    """One run dir as a Run (rounds may be empty); problems with its files are appended to `warnings`."""
    directory = os.path.abspath(directory)
    lineage = read_json_or_warn(paths.lineage_file(directory), "lineage file", warnings)
    config = read_json_or_warn(paths.config_file(directory), "config file", warnings).get("config") or {}
    records, skipped = read_metrics(paths.metrics_file(directory))
    if skipped:
        warnings.append(f"{paths.metrics_file(directory)}: skipped {skipped} unreadable line(s)")
    # metrics.jsonl knows the epochs and FLOPs; lineage.json, written with the checkpoint, wins on the numbers
    merged = {r["round"]: dict(r) for r in records if r.get("type") == "round" and "round" in r}
    lineage_rounds = sorted((e for e in lineage.get("rounds", []) if isinstance(e, dict) and "round" in e),
                            key=lambda e: e["round"])
    for entry in lineage_rounds:
        merged[entry["round"]] = {**merged.get(entry["round"], {}), **entry}
    rows = sorted(filter(None, map(_row, merged.values())), key=lambda r: r.round)
    if config.get("struct") == "token" or any(r.tokens_kept is not None for r in rows):
        unsized = [r.round for r in rows if r.tokens_kept is None]  # their round record in metrics.jsonl is lost
        if unsized:
            warnings.append(f"{directory}: --struct token round(s) {compact_rounds(unsized)} have no tokens_kept "
                            f"in metrics.jsonl, left out")
            rows = [r for r in rows if r.tokens_kept is not None]
    for row in rows:
        row.throughput = read_throughput(directory, row.round, warnings)
    label = run_label(config, os.path.basename(directory))
    run = Run(directory, label, rows, recorded_dir=lineage.get("run_dir"), config=config, base=label)
    parent = (lineage_rounds[0].get("parent") if lineage_rounds else None) or config.get("resume_from")
    if parent and norm_path(os.path.dirname(parent)) not in run.names():  # else: its own rewind.pth.tar
        run.origin = parent
    return run


def _disambiguate(runs: list) -> None:
    """Equal labels (seeds of one experiment, a re-run, a copy) get what tells them apart: the seed,
    else the round they branched at, else the directory; a hint that is equal for all of them is skipped."""
    hints = (lambda run: f"seed={run.config['seed']}" if "seed" in run.config else None,
             lambda run: f"from round {run.branch_round}" if run.branch_round is not None else None,
             lambda run: f"({os.path.relpath(run.directory)})")
    for hint in hints:
        by_label = {}
        for run in runs:
            by_label.setdefault(run.label, []).append(run)
        for same in (group for group in by_label.values() if len(group) > 1):
            if len({hint(run) for run in same}) > 1:
                for run in same:
                    run.label = f"{run.label} {hint(run) or ''}".rstrip()


def name_runs(runs: list) -> None:
    """Unique labels; a control reads '<its ticket's label> · random reinit' when its ticket is here."""
    tickets = [run for run in runs if not run.control]
    _disambiguate(tickets)
    points = branch_points(runs)
    for run in (run for run in runs if run.control):
        parent = points.get(run, (None, None))[0]
        kind = CONTROL_KINDS[run.control]
        run.base = f"{parent.base if parent else run.base} · {kind}"
        run.label = f"{parent.label if parent else run.label} · {kind}"
    _disambiguate(runs)


def load_runs(inputs: list) -> tuple:
    """(runs in lineage order, warnings) for run dirs or folders of run dirs; UsageError names a bad path."""
    runs, seen, warnings = [], set(), []
    for given in inputs:
        if not os.path.isdir(given):
            raise UsageError(f"{given}: {'not a directory' if os.path.exists(given) else 'no such directory'}")
        named_directly = is_run_dir(given)
        candidates = [given] if named_directly else run_dirs_under(given)
        if not candidates:
            raise UsageError(f"{given}: not a run dir (no config.json, lineage.json or metrics.jsonl here or below)")
        for directory in (d for d in candidates if os.path.realpath(d) not in seen):
            seen.add(os.path.realpath(directory))
            run = read_run(directory, warnings)
            if run.rounds:
                runs.append(run)
            elif named_directly:
                raise UsageError(f"{directory}: no finished rounds yet")
            else:  # one run of a sweep still in its first round must not block the sweep's report
                warnings.append(f"{directory}: no finished rounds yet, left out")
    if not runs:
        raise UsageError(f"{' '.join(inputs)}: no run dir with finished rounds")
    name_runs(runs)
    return [run for run, _ in walk_tree(runs)], warnings
