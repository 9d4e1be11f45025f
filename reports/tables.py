"""The report's tables: every round of every series (markdown), a rounds-as-columns summary, and the CSV.

Numbers of a series of several seeds read `mean ± std` (or `mean [min, max]` with --spread range);
one run's numbers read as they are. "best" is always the best *validation* round (the test set never
selects), its test top-1 beside it.
"""
import csv
import io
import os
from typing import Optional

from reports.series import Series, SeriesRow, group_series, is_experiment_key


def render(header: list, body: list) -> str:
    """A markdown table: the first column left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    rule = ["-" * widths[0]] + ["-" * (w - 1) + ":" for w in widths[1:]]
    return "\n".join("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                       enumerate(zip(cells, widths))) + " |" for cells in [header, rule] + body)


def _text(value, digits: int = 2) -> str:
    return "-" if value is None else value.text(digits)


def _mflops(row: SeriesRow) -> str:
    flops = row.flops_per_image
    return "-" if flops is None else f"{flops.mean / 1e6:.1f}" + (f" ± {(flops.hi - flops.mean) / 1e6:.1f}"
                                                                  if flops.n > 1 and flops.spread == "std" else "")


def _img_s(row: SeriesRow) -> str:
    """'1432 (fp32)', '2810 ± 40 (bf16, compiled)': img/s of two dtypes or compile settings never read alike."""
    if row.throughput is None:
        return "-"
    return f"{_text(row.throughput, 0)} ({' / '.join(row.throughput_settings)})"


# (header, shown when any series ..., cell of a round); "val top-1" and "epochs" change in the best row
COLUMNS = [
    ("remaining %", lambda s: True, lambda row: _text(row.remaining_pct)),
    ("tokens kept", lambda s: s.is_token, lambda row: _text(row.tokens_kept, 0)),
    ("MFLOPs / image", lambda s: any(r.flops_per_image for r in s.rows), _mflops),
    ("test top-1", lambda s: True, lambda row: _text(row.test_top1)),
    ("val top-1", lambda s: True, lambda row: _text(row.val_top1)),
    ("epochs", lambda s: True, lambda row: "-" if row.epochs is None else str(row.epochs)),
    ("img/s (b256)", lambda s: any(r.throughput for r in s.rows), _img_s),
    ("seeds", lambda s: len(s.runs) > 1, lambda row: str(row.n)),
]


def markdown_table(runs: list, spread: str = "std") -> str:
    """Every round of every series, then a summary row marking the round with the best validation
    top-1. Optional columns (tokens kept, MFLOPs, measured img/s, seeds) appear when a series has them."""
    series = group_series(runs, spread)
    columns = [c for c in COLUMNS if any(c[1](s) for s in series)]
    header = ["run", "round"] + [name for name, _, _ in columns]
    body = []
    for s in series:
        label, best = s.label.replace("|", "\\|"), s.best()
        body += [[label, str(row.round)] + [cell(row) for _, _, cell in columns] for row in s.rows]
        if best is None:
            body.append([label, "no best: no validation split"] + [""] * len(columns))
            continue
        marked = {"val top-1": f"**{_text(best.val_top1)}**", "epochs": "", "seeds": ""}
        body.append([label, f"**best val** (round {best.round})"] +
                    [marked.get(name, cell(best)) for name, _, cell in columns])
    return render(header, body)


def _size(s: Series, row: SeriesRow) -> str:
    return f"{row.tokens_kept.mean:.0f} tok" if s.is_token else f"{row.remaining_pct.mean:.3g}%"


def round_cell(s: Optional[Series], index: int) -> str:
    """'71.25 ± 0.50 @ 50%': a round's test top-1 over the seeds and what it keeps; '-' when not reached."""
    row = next((r for r in s.rows if r.round == index), None) if s else None
    return "-" if row is None else f"{row.test_top1.text()} @ {_size(s, row)}"


def best_cell(s: Optional[Series]) -> str:
    best = s.best() if s else None
    return "-" if best is None else f"round {best.round}: {round_cell(s, best.round)} (val {best.val_top1.text()})"


def pivot_table(settings: list, rows: list, trailer: Optional[str] = None) -> str:
    """Rounds as columns. `rows` are (setting values, seeds text, Series or None[, trailer cell]); `settings`
    names the setting columns. A cell is the round's test top-1 (mean ± spread over seeds) @ remaining;
    then the best-validation round, then, when `trailer` names one, a last column of the rows' own text."""
    rounds = sorted({r.round for row in rows if row[2] for r in row[2].rows})
    header = settings + ["seeds"] + [f"round {k}" for k in rounds] + ["best (val)"] + ([trailer] if trailer else [])
    body = [[*values, seeds] + [round_cell(s, k) for k in rounds] + [best_cell(s)] + (list(extra) if trailer else [])
            for values, seeds, s, *extra in rows]
    return render(header, [[cell.replace("|", "\\|") for cell in row] for row in body])


def differing_keys(series: list) -> list:
    """The experiment keys of config.json whose values differ between series, sorted."""
    keys = sorted({k for s in series for k in s.config if is_experiment_key(k)})
    return [k for k in keys if len({repr(s.config.get(k)) for s in series}) > 1]


def setting_text(key: str, value) -> str:
    """A config value as a summary cell: '-' when absent; `branch` reads 'ticket' for a ticket or an
    ordinary branch (None, 'continue') and the control kind otherwise."""
    if key == "branch":
        return "ticket" if value in (None, "continue") else str(value)
    return "-" if value is None else str(value)


def run_names(runs: list) -> dict:
    """{run: its directory relative to the folder all the runs share} ('crit_rate/l1_seed-1'); the
    directory's own name when that says nothing (one run)."""
    directories = [os.path.abspath(run.directory) for run in runs]
    common = os.path.commonpath(directories) if directories else ""
    return {run: (os.path.relpath(d, common) if d != common else os.path.basename(d)) for run, d in zip(runs, directories)}


def summary_table(runs: list, spread: str = "std") -> str:
    """The pivot table of a folder of runs without sweep.json: one row per series, set apart by the
    config keys that differ between them (a branch also by the round it started from); the last column,
    `run dir`, names each row's run dir(s) relative to their common folder, so a row leads to its runs."""
    series = group_series(runs, spread)
    keys, names = differing_keys(series) or ["run"], run_names(runs)
    rows = [([s.label if k == "run" else setting_text(k, s.config.get(k)) for k in keys] +
             [f"round {s.branch_round}" if s.branch_round is not None else "start"], str(len(s.runs)), s,
             ", ".join(names[run] for run in s.runs)) for s in series]
    return pivot_table(keys + ["from"], rows, trailer="run dir")


CSV_COLUMNS = ["run", "run_dir", "arch", "dataset", "struct", "criteria", "rate", "seed", "branch", "round",
               "remaining_pct", "tokens_kept", "flops_per_image", "test_top1", "val_top1", "epochs",
               "throughput_img_s", "throughput_variant", "throughput_device", "throughput_dtype", "throughput_compile",
               "throughput_masked_img_s"]


def csv_text(runs: list) -> str:
    """One line per (run, round) with CSV_COLUMNS; empty cells where a value is absent."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for run in runs:
        config = run.config
        for row in run.rounds:
            speed = row.throughput
            writer.writerow([run.label, run.directory, config.get("arch"), config.get("dataset"), config.get("struct"),
                             config.get("criteria"), config.get("rate"), config.get("seed"), config.get("branch"),
                             row.round, row.remaining_pct, row.tokens_kept, row.flops_per_image, row.test_top1,
                             row.val_top1, row.epochs, *(
                                 (speed.median, speed.variant, speed.device, speed.dtype, speed.compiled,
                                  speed.masked_median) if speed else [None] * 6)])
    return out.getvalue()
