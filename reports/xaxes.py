"""What a report can put on the x axis of accuracy: a registry of XAxis, and their fixed ticks.

- remaining: % of prunable weights left, log axis decreasing left to right (as in IMP papers,
  Frankle & Carbin 2019), ticks only at 100, 50, 20, 10, 5, 2, 1 % (and 0.5, 0.2, ... below 1 %);
- flops: FLOPs per image of the round's model (the round record's `flops_per_image`), log, decreasing;
- throughput: measured img/s at batch 256 from `<run>/compact/round_<k>.json`, linear, increasing; its
  dtype / compile setting travels with it, and the masked model's img/s of the same export is drawn faint
  beside the compact one's;
- tokens: tokens kept per image; `--struct token` runs use it wherever `remaining` is asked for,
  since their weights stay at 100 %.
Tick values never come from the data, so labels never collide ("49.7" over "50"); on the 1-2-5 axes the
limits reach the next tick beyond the data on each side, so every point lies between two labelled ticks.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

from reports.series import SeriesRow, Stat


def one_two_five(lo: float, hi: float) -> list:
    """The values m * 10^e (m in 1, 2, 5) within [lo, hi], largest first; decades only when the range
    spans more than 4 of them (so labels keep their room). [] when lo > hi or lo <= 0."""
    if lo <= 0 or lo > hi:
        return []
    mantissas = (1,) if math.log10(hi / lo) > 4 else (1, 2, 5)
    values = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
              for m in mantissas]
    return sorted((round(v, 12) for v in values if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)), reverse=True)


def one_two_five_bounds(lo: float, hi: float) -> tuple:
    """(the largest tick <= lo, the smallest tick >= hi) of the 1-2-5 ticks one_two_five draws between them:
    the x limits reach out to them, so every point lies between two labelled ticks (25 % between 50 and 20,
    not past the last label). Decades only once 1-2-5 bounds would span more than 4 decades, as
    one_two_five does. Raises ValueError when lo <= 0 or lo > hi."""
    if lo <= 0 or lo > hi:
        raise ValueError(f"1-2-5 bounds need 0 < lo <= hi, got {lo}, {hi}")
    for mantissas in ((1, 2, 5), (1,)):
        grid = [round(m * 10.0 ** e, 12) for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
                for m in mantissas]
        below = max(v for v in grid if v <= lo * (1 + 1e-9))
        above = min(v for v in grid if v >= hi * (1 - 1e-9))
        if math.log10(above / below) <= 4:
            break
    return below, above


def engineering(value: float) -> str:
    """200000000 -> '200M', 1500 -> '1.5k', 0.5 -> '0.5'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{round(value / scale, 6):g}{unit}"
    return f"{round(value, 6):g}"


@dataclass(frozen=True)
class XAxis:
    name: str
    label: str
    value: Callable[[SeriesRow], Optional[Stat]]
    log: bool
    decreasing: bool                    # less model to the right
    fixed_ticks: Optional[Callable[[float, float], list]]  # (lo, hi) of the data -> tick values; None: matplotlib's
    tick_label: Callable[[float], str]
    title: str = ""                     # the plot's default title
    missing: str = ""                   # why a run may lack this x (the note when it is left out)
    bounds: Optional[Callable[[float, float], tuple]] = None  # (lo, hi) of the data -> the fixed ticks just
    #                                                           outside it, where the x limits go
    settings: Optional[Callable[[SeriesRow], tuple]] = None  # how a round's value was measured ('fp32', ...):
    #                                                          values of two settings are not comparable
    companion: Optional[Callable[[SeriesRow], Optional[Stat]]] = None  # a second x of the same round, drawn
    #                                                                    faint (the masked model's img/s)
    companion_label: str = ""           # the legend's word for the faint companion points


REMAINING = XAxis("remaining", "remaining weights (%)", lambda row: row.remaining_pct, log=True, decreasing=True,
                  fixed_ticks=lambda lo, hi: one_two_five(lo, min(hi, 100.0)), tick_label=lambda v: f"{v:g}",
                  title="Accuracy vs remaining weights",
                  bounds=lambda lo, hi: one_two_five_bounds(min(lo, 100.0), min(hi, 100.0)))
TOKENS = XAxis("tokens", "tokens kept per image (--struct token)", lambda row: row.tokens_kept, log=False,
               decreasing=True, fixed_ticks=None, tick_label=lambda v: f"{v:g}")
FLOPS = XAxis("flops", "FLOPs per image", lambda row: row.flops_per_image, log=True, decreasing=True,
              fixed_ticks=one_two_five, tick_label=engineering, title="Accuracy vs FLOPs per image",
              missing="no flops_per_image in the metrics.jsonl round records (runs from before FLOPs were logged)",
              bounds=one_two_five_bounds)
THROUGHPUT = XAxis("throughput", "throughput (img/s, batch 256, measured)", lambda row: row.throughput,
                   log=False, decreasing=False, fixed_ticks=None, tick_label=engineering,
                   title="Accuracy vs measured throughput",
                   missing="no compact/round_<k>.json (rounds never exported with export_compact.py)",
                   settings=lambda row: row.throughput_settings, companion=lambda row: row.masked_throughput,
                   companion_label="faint: the masked model's img/s at the same round (speedup = the gap)")

X_AXES = {axis.name: axis for axis in (REMAINING, FLOPS, THROUGHPUT)}  # --x choices; TOKENS is implied


def axis_for(x: str, is_token: bool) -> XAxis:
    """The axis a series is drawn on when `--x x` is asked: token runs trade weights for tokens."""
    return TOKENS if x == "remaining" and is_token else X_AXES[x]


def drawable(axis: XAxis, row: SeriesRow) -> bool:
    """A round has a place on the axis: a value, and a positive one on a log axis (0 % has none)."""
    value = axis.value(row)
    return value is not None and math.isfinite(value.mean) and (value.mean > 0 or not axis.log)
