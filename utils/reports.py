"""Reports over run dirs: per-round table, accuracy-vs-remaining plot, lineage tree of branches.

Only the plain-text artifacts a run writes are read (lineage.json, metrics.jsonl,
config.json), never the checkpoints, so a report is cheap and works on run dirs
copied off a cluster. Readers tolerate missing or half-written files: a run that
crashed mid-write still reports the rounds it finished.
"""
import json
import os
from dataclasses import dataclass
from typing import Optional

from utils import paths
from utils.errors import UsageError

DEFAULT_TITLE = "Accuracy vs remaining weights"
MARKERS = "osD^vP*X"


@dataclass
class RoundRow:
    round: int
    remaining_pct: float                # % of the prunable weights left (100 for every --struct token round)
    test_top1: float
    val_top1: Optional[float] = None    # best validation top-1 of the round; None without a validation split
    epochs: Optional[int] = None
    tokens_kept: Optional[int] = None   # --struct token: tokens per image (prefix + patch) from the start block on


@dataclass(eq=False)  # identity equality: runs are dict keys in the lineage tree
class Run:
    directory: str
    label: str
    rounds: list                        # RoundRow, sorted by round
    origin: Optional[str] = None        # parent file of the first round when it lies in another run dir
    recorded_dir: Optional[str] = None  # run_dir as written in lineage.json: where the run was made

    @property
    def is_token(self) -> bool:
        """A --struct token run: its rounds shrink the tokens, so its x is tokens kept, not weights."""
        return any(r.tokens_kept is not None for r in self.rounds)

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
        recorded = {_norm(self.recorded_dir)} if self.recorded_dir else set()
        return {_norm(self.directory), os.path.realpath(self.directory)} | recorded


def _norm(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


# ---- reading -----------------------------------------------------------------------------------
def is_run_dir(directory: str) -> bool:
    return os.path.isfile(paths.lineage_file(directory)) or os.path.isfile(paths.metrics_file(directory))


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


def _read_json(path: str, warnings: list) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.append(f"{path}: unreadable ({type(exc).__name__}), ignored")
        return {}
    return value if isinstance(value, dict) else {}


def _optional(value, kind):
    return None if value is None else kind(value)


def _row(entry: dict) -> Optional[RoundRow]:
    try:
        return RoundRow(int(entry["round"]), float(entry["remaining_pct"]), float(entry["test_top1"]),
                        _optional(entry.get("val_top1"), float), _optional(entry.get("epochs"), int),
                        _optional(entry.get("tokens_kept"), int))
    except (KeyError, TypeError, ValueError):
        return None  # a record missing its numbers has nothing to plot


def run_label(config: dict, fallback: str) -> str:
    """A readable name from the flags that tell experiments apart."""
    if not config:
        return fallback
    parts = [f"{config.get('struct', '?')}{'+head' if config.get('vit_structured') else ''}",
             config.get("arch", "?"), config.get("dataset", "?"), f"rate={config.get('rate', '?')}",
             *([f"crit={config['criteria']}"] if config.get("struct") in ("refill", "rsst") else [])] + ([f"[{config['exp_name']}]"] if config.get("exp_name") else [])
    return " ".join(str(part) for part in parts)


def read_run(directory: str, warnings: list) -> Run:
    directory = os.path.abspath(directory)
    lineage = _read_json(paths.lineage_file(directory), warnings)
    config = _read_json(paths.config_file(directory), warnings).get("config") or {}
    records, skipped = read_metrics(paths.metrics_file(directory))
    if skipped:
        warnings.append(f"{paths.metrics_file(directory)}: skipped {skipped} unreadable line(s)")
    # metrics.jsonl knows the epochs; lineage.json, written with the checkpoint, wins on the numbers
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
    run = Run(directory, run_label(config, os.path.basename(directory)), rows, recorded_dir=lineage.get("run_dir"))
    parent = lineage_rounds[0].get("parent") if lineage_rounds else None
    if parent and _norm(os.path.dirname(parent)) not in run.names():  # else: its own rewind.pth.tar
        run.origin = parent
    return run


def load_runs(inputs: list) -> tuple:
    """(runs in lineage order, warnings) for run dirs or folders of run dirs; UsageError names a bad path."""
    runs, seen, warnings = [], set(), []
    for given in inputs:
        if not os.path.isdir(given):
            raise UsageError(f"{given}: {'not a directory' if os.path.exists(given) else 'no such directory'}")
        named_directly = is_run_dir(given)
        candidates = [given] if named_directly else run_dirs_under(given)
        if not candidates:
            raise UsageError(f"{given}: not a run dir (no lineage.json or metrics.jsonl here or below)")
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
    labels = [run.label for run in runs]
    for run in runs:  # the same flags in two dirs (a re-run, a copy): the dir tells them apart
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({os.path.relpath(run.directory)})"
    return [run for run, _ in _walk_tree(runs)], warnings


# ---- lineage -----------------------------------------------------------------------------------
def branch_points(runs: list) -> dict:
    """{branch run: (parent run, parent round or None)} for branches whose parent is in the report."""
    by_name = {name: run for run in runs for name in run.names()}
    points = {}
    for run in runs:
        parent = by_name.get(_norm(os.path.dirname(run.origin))) if run.origin else None
        if parent is not None and parent is not run:
            points[run] = (parent, paths.round_index_of(run.origin))
    return points


def compact_rounds(numbers: list) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    spans = []
    for n in sorted(set(numbers)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _walk_tree(runs: list) -> list:
    """[(run, line prefix)] depth first: each branch right under the run it started from."""
    points = branch_points(runs)
    children = {run: sorted((kid for kid in runs if points.get(kid, (None,))[0] is run),  # by branch round
                            key=lambda kid: (points[kid][1] is None, points[kid][1] or 0, kid.directory))
                for run in runs}
    order, seen = [], set()

    def walk(run: Run, first: str, rest: str) -> None:
        if run in seen:
            return
        seen.add(run)
        order.append((run, first))
        for i, kid in enumerate(children[run]):
            last, at = i == len(children[run]) - 1, points[kid][1]
            where = f"round {at}" if at is not None else os.path.basename(kid.origin)
            walk(kid, f"{rest}{'└── ' if last else '├── '}branch at {where}: ",
                 rest + ("    " if last else "│   "))

    for run in runs:
        if run not in points:
            walk(run, "", "")
    for run in runs:  # only a (corrupt) cycle of branches leaves runs unvisited
        walk(run, "", "")
    return order


def lineage_tree(runs: list) -> str:
    """Runs as nodes; a branch hangs under the run it started from, marked with the round."""
    points, lines = branch_points(runs), []
    for run, prefix in _walk_tree(runs):
        best, first, last = run.best(), run.size(run.rounds[0]), run.size(run.rounds[-1])
        kept = first if len(run.rounds) == 1 else f"{first}->{last}"
        chosen = (f"best val {best.val_top1:.2f} (test {best.test_top1:.2f}) @ {run.size(best)}" if best
                  else "no validation split")
        # a branch under its parent needs no path; one whose parent is not in the report does
        foreign = f"  [branched from {run.origin}, not in this report]" if run.origin and run not in points else ""
        lines.append(f"{prefix}{run.label}  rounds {compact_rounds([r.round for r in run.rounds])}  "
                     f"{'tokens' if run.is_token else 'remaining'} {kept.replace(' tokens', '')}  {chosen}  "
                     f"({run.directory}){foreign}")
    return "\n".join(lines)


# ---- table and plot ----------------------------------------------------------------------------
def _fmt(value) -> str:
    return "-" if value is None else str(value) if isinstance(value, int) else f"{value:.2f}"


def markdown_table(runs: list) -> str:
    """One table: every round of every run, then a summary row marking the round with the best
    validation top-1 (its test top-1 beside it, as reported, never used to choose). A `tokens kept`
    column appears when a --struct token run is in the report."""
    tokens = any(run.is_token for run in runs)
    header = ["run", "round", "remaining %"] + ["tokens kept"] * tokens + ["test top-1", "val top-1", "epochs"]
    body = []
    for run in runs:
        label, best = run.label.replace("|", "\\|"), run.best()
        body += [[label, str(r.round), _fmt(r.remaining_pct)] + [_fmt(r.tokens_kept)] * tokens +
                 [_fmt(r.test_top1), _fmt(r.val_top1), _fmt(r.epochs)] for r in run.rounds]
        if best is None:
            body.append([label, "no best: no validation split", ""] + [""] * tokens + ["", "", ""])
        else:
            body.append([label, f"**best val** (round {best.round})", _fmt(best.remaining_pct)] +
                        [_fmt(best.tokens_kept)] * tokens + [_fmt(best.test_top1), f"**{_fmt(best.val_top1)}**", ""])
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    rule = ["-" * widths[0]] + ["-" * (w - 1) + ":" for w in widths[1:]]  # numbers right-aligned
    return "\n".join("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                       enumerate(zip(cells, widths))) + " |" for cells in [header, rule] + body)


def accuracy_plot_png(runs: list, title: str = DEFAULT_TITLE) -> bytes:
    """The report's plot as PNG bytes (utils/report_plot.py: a weights panel and, for --struct token
    runs, a tokens-kept panel). matplotlib is imported only here: the rest of a report needs none."""
    from utils.report_plot import accuracy_plot_png as render
    return render(runs, title)
