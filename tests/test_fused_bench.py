"""benchmarks/fused_speed.py on the CPU: flags, the sweep estimate, the N-process protocol, a tiny run."""
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from benchmarks import concurrent
from benchmarks.fused_speed import main
from benchmarks.fused_sweep import sweep_hours
from benchmarks.fused_table import add_big_batch, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flag,value,message", [
    ("--cells", "1,x", "error: --cells '1,x': expected comma-separated positive integers"),
    ("--cells", "0,2", "error: --cells '0,2': every value must be between 1 and 256"),
    ("--batch_sizes", "", "error: --batch_sizes '': expected comma-separated positive integers"),
    ("--archs", "res20s,nope_net", "error: --archs: unknown architecture nope_net"),
    ("--warmup", "0", "error: --warmup 0: must be at least 1"),
])
def test_bad_flag_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, flag, value, message):
    out = tmp_path / "r" / "f.json"
    assert main(["--out", str(out), "--device", "cpu", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_sweep_hours_numbers():
    # 3600 images per cell; one run at 100 img/s: 6 cells x 36 s = 0.06 h
    hours = sweep_hours(100.0, {2: 150.0, 4: 400.0}, cells=6, rounds=2, epochs_per_round=3, images_per_epoch=600)
    assert hours["one_at_a_time_hours"] == pytest.approx(0.06)
    # N=2: 3 groups x (3600 images per cell at 75 img/s per cell = 48 s); N=4: 2 groups x 36 s (a group of 2 is
    # charged a full group's time)
    assert hours["grouped_hours"] == pytest.approx({2: 3 * 48 / 3600, 4: 2 * 36 / 3600})
    with pytest.raises(ValueError, match="positive"):
        sweep_hours(100.0, {2: 0.0}, cells=6, rounds=1, epochs_per_round=1, images_per_epoch=1)


def test_aggregate_uses_the_union_window():
    records = [{"images": 100, "start": 10.0, "end": 11.0}, {"images": 100, "start": 10.5, "end": 12.0}]
    result = concurrent.aggregate(records)
    assert result["img_s"] == pytest.approx(200 / 2.0)
    assert result["sum_img_s"] == pytest.approx(100 + 100 / 1.5)
    assert result["start_spread_s"] == pytest.approx(0.5)
    assert concurrent.aggregate(records + [{"error": "OutOfMemoryError: x"}]) == {"error": "OutOfMemoryError: x"}


def test_barrier_waits_for_every_rank(tmp_path):
    arrived = []
    threads = [threading.Thread(target=lambda r=r: (concurrent.barrier(str(tmp_path), "ready0", r, 3, timeout=20),
                                                     arrived.append(r))) for r in range(2)]
    for thread in threads:
        thread.start()
    threads[0].join(0.3)
    assert arrived == []  # two of three ranks: still waiting
    concurrent.barrier(str(tmp_path), "ready0", 2, 3, timeout=20)
    for thread in threads:
        thread.join(20)
    assert sorted(arrived) == [0, 1]
    with pytest.raises(TimeoutError, match="barrier done0"):
        concurrent.barrier(str(tmp_path), "done0", 0, 2, timeout=0.05)


WORKER = """
import os, sys, time
from benchmarks.concurrent import worker_config, ENV_RANK
rank = int(os.environ[ENV_RANK])
def window(steps):  # one clock reading: a second one would lengthen the window by the time between the two
    now = time.time()
    return now, now + 0.5
def build():
    if rank == 1:
        raise MemoryError("cell too big")
    return lambda k: None
worker_config(0, lambda: (lambda k: None), lambda s: None, window, 64, str)
worker_config(1, build, lambda s: None, window, 64, repr)
if rank == 2:
    sys.exit("worker gave up")
worker_config(2, lambda: (lambda k: None), lambda s: None, window, 64, str)
"""


def test_run_group_collects_rates_and_errors():
    results = concurrent.run_group(3, [sys.executable, "-c", WORKER], configs=3, timeout=60)
    # three windows of 0.5 s from the barrier on: their union is 0.5 s plus the spread of their starts (how far
    # apart the processes left the barrier; on a loaded 2-core machine that varies, so it is read, not bounded)
    spread = results[0]["start_spread_s"]
    assert 0 <= spread < 5 and results[0]["img_s"] == pytest.approx(3 * 64 / (0.5 + spread)), results
    assert results[0]["sum_img_s"] == pytest.approx(3 * 64 / 0.5), results
    assert results[1] == {"error": "MemoryError('cell too big')"}, results
    # rank 2 exited after config 1: the parent tells ranks 0 and 1 to leave config 2's barrier at once
    assert results[2]["error"].startswith("worker 0 exited with code 1: RuntimeError: barrier ready2: a peer"), results


@pytest.mark.usefixtures("one_thread")
def test_tiny_run_writes_rows_and_estimate(tmp_path, capsys):
    out = tmp_path / "fused.json"
    assert main(["--out", str(out), "--device", "cpu", "--steps", "2", "--warmup", "1", "--cells", "1,2",
                 "--batch_sizes", "4", "--archs", "res20s", "--max_processes", "1", "--sweep_estimate",
                 "--rounds", "2", "--epochs_per_round", "3", "--big_batch"]) == 0
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["flags"]["cells"] == [1, 2]
    rows = record["rows"]
    assert [(r["arch"], r["batch_size"], r["cells"]) for r in rows] == [("res20s", 4, 1), ("res20s", 4, 2)]
    for r in rows:
        assert r["fused_img_s"] > 0 and r["one_run_img_s"] > 0 and r["fused_route"] == "grouped"
        assert r["fused_speedup"] == pytest.approx(r["fused_img_s"] / r["one_run_img_s"])
    assert rows[0]["processes_img_s"] == rows[0]["one_run_img_s"] and "processes_img_s" not in rows[1]
    # --big_batch: one plain run at 2 x 4 images per step next to the 2 fused cells; none for one cell
    assert "big_batch_img_s" not in rows[0] and rows[1]["big_batch_img_s"] > 0
    assert rows[1]["fused_vs_big_batch"] == pytest.approx(rows[1]["fused_img_s"] / rows[1]["big_batch_img_s"])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("arch "))
    assert re.split(r"\s{2,}", header)[-2:] == ["one run at N*batch img/s", "fused vs it"]
    estimate = record["sweep_estimate"]["estimates"][0]
    one = rows[0]["one_run_img_s"]
    assert estimate["one_at_a_time_hours"] == pytest.approx(6 * 2 * 3 * 45000 / one / 3600)
    assert set(estimate["fused_hours_by_group"]) == {"1", "2"}  # JSON keys
    assert "sweep estimate, res20s batch 4" in printed


@pytest.mark.slow
def test_the_documented_cpu_run(tmp_path):
    """The brief's CPU command, N processes included (about a minute on 2 busy cores)."""
    out = tmp_path / "f.json"
    subprocess.run([sys.executable, "-m", "benchmarks.fused_speed", "--out", str(out), "--device", "cpu",
                    "--steps", "3", "--warmup", "1", "--cells", "1,2", "--batch_sizes", "8", "--archs",
                    "res20s,test_vit"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["arch"], r["cells"]) for r in rows] == [("res20s", 1), ("res20s", 2), ("test_vit", 1), ("test_vit", 2)]
    for r in rows:
        assert r["fused_img_s"] > 0 and r["one_run_img_s"] > 0 and r["processes_img_s"] > 0, r
    assert rows[1]["processes_sum_img_s"] > 0 and rows[1]["processes_start_spread_s"] < 1.0


def test_big_batch_columns_and_errors():
    row = {"arch": "res20s", "batch_size": 128, "cells": 8, "fused_img_s": 120.0, "one_run_img_s": 50.0,
           "fused_speedup": 2.4}
    add_big_batch(row, {"img_s": 100.0, "peak_mib_per_cell": 9.0})
    assert row["big_batch_img_s"] == 100.0 and row["fused_vs_big_batch"] == pytest.approx(1.2)
    failed = {"arch": "res20s", "batch_size": 512, "cells": 16, "one_run_img_s": 50.0}
    add_big_batch(failed, {"error": "OutOfMemoryError('CUDA out of memory')"})
    assert failed["big_batch_error"].startswith("OutOfMemoryError") and "fused_vs_big_batch" not in failed
    lines = table([row, failed]).splitlines()
    assert re.split(r"\s{2,}", lines[0])[-2:] == ["one run at N*batch img/s", "fused vs it"]
    assert lines[1].split()[-2:] == ["100", "1.20x"] and "OutOfMemoryError('CUDA out of memory')" in lines[2]
    assert "one run at N*batch" not in table([{k: v for k, v in row.items() if "big" not in k}])
