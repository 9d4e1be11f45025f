"""benchmarks/sweep_wallclock.py: the extrapolation's arithmetic, the epoch times it reads, its refusals, and (slow)
a real fused and one-at-a-time sweep on synthetic data."""
import json

import pytest

from benchmarks.fused_sweep import faster_or_slower
from benchmarks.sweep_wallclock import (check_sweep, device_name, extrapolated_hours, fused_groups, has_flag, main,
                                        merged_sweeps, parse_args, steady_epoch_seconds)
from utils.errors import UsageError


def test_extrapolation_adds_the_missing_epochs_of_every_sequential_process():
    # 600 s measured; 20 rounds x (20 - 1) missing epochs; processes of 2 s and 3 s one after another
    assert extrapolated_hours(600.0, [2.0, 3.0], rounds=20, epochs=1, target_epochs=20) == pytest.approx(
        (600 + 20 * 19 * 5) / 3600)
    assert extrapolated_hours(600.0, [2.0], rounds=20, epochs=4, target_epochs=4) == pytest.approx(600 / 3600)
    with pytest.raises(ValueError, match="target_epochs >= epochs"):
        extrapolated_hours(1.0, [1.0], rounds=1, epochs=3, target_epochs=2)
    with pytest.raises(ValueError, match="at least one process"):
        extrapolated_hours(1.0, [], rounds=1, epochs=1, target_epochs=2)


def write_metrics(run_dir, epoch_seconds, epochs_a_round=None):
    """metrics.jsonl of epochs taking `epoch_seconds`, `epochs_a_round` epochs in each round (default: one round)."""
    run_dir.mkdir()
    per_round = epochs_a_round or max(len(epoch_seconds), 1)
    records = [{"type": "epoch", "round": i // per_round, "epoch": i % per_round + 1, "epoch_seconds": s}
               for i, s in enumerate(epoch_seconds)]
    records.append({"type": "round", "round": 0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(run_dir)


def test_steady_epoch_seconds_leaves_the_first_epoch_out(tmp_path):
    assert steady_epoch_seconds(write_metrics(tmp_path / "a", [30.0, 2.0, 4.0, 3.0])) == 3.0
    # two epochs a round: each round's first epoch (the round's start, a fused group's waits for every cell's
    # pruning and checkpoints) is left out, the median of the second epochs taken
    assert steady_epoch_seconds(write_metrics(tmp_path / "r", [30.0, 2.0, 9.0, 2.5, 8.0, 2.2], 2)) == 2.2
    # one epoch a round: all but the run's first (an upper bound)
    assert steady_epoch_seconds(write_metrics(tmp_path / "one", [30.0, 9.0, 8.0, 7.0], 1)) == 8.0
    assert steady_epoch_seconds(write_metrics(tmp_path / "b", [30.0])) == 30.0  # the only epoch
    empty = write_metrics(tmp_path / "c", [])
    with pytest.raises(UsageError, match=r"c/metrics\.jsonl: no epoch record"):
        steady_epoch_seconds(empty)


def test_fused_groups_are_read_from_the_sweeps_group_files(tmp_path):
    (tmp_path / "fused").mkdir()
    commands = [["--rate", "0.2", "--save_dir", str(tmp_path / "a")], ["--save_dir", str(tmp_path / "b") + "/"]]
    (tmp_path / "fused" / "fused-a-and-1-more.json").write_text(json.dumps({"cells": commands}))
    (tmp_path / "fused" / "fused-a-and-1-more.results.json").write_text("{}")
    assert fused_groups(str(tmp_path), ["a", "b", "c"]) == [["a", "b"], ["c"]]  # c could not be fused: alone
    assert fused_groups(str(tmp_path / "none"), ["a"]) == [["a"]]


@pytest.mark.parametrize("argv, message", [
    (["--target_epochs", "1", "--epochs", "2"], r"^--target_epochs 1: must be at least --epochs \(2\)$"),
    (["--executors", "fused,slurm"], r"^--executors fused,slurm: choose fused, local or fused,local$"),
    (["--rounds", "0"], r"^--rounds 0: must be at least 1$"),
    (["--", "--arch", "res20s", "--epochs", "3"],
     r"^runner flags: --epochs are set by the benchmark \(use its --epochs\)$"),
    (["--", "--save_dir=x", "--pruning_times=2"],
     r"^runner flags: --pruning_times, --save_dir are set by the benchmark \(use its --rounds, --root\)$"),
])
def test_refusals(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["--out", "x.json", *argv])


def test_out_is_checked_before_any_work(tmp_path):
    with pytest.raises(UsageError, match=r"^--out .*: is a folder, expected a file path$"):
        parse_args(["--out", str(tmp_path)])
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=r"^--out .*file/w\.json: .*file is a file, not a folder$"):
        parse_args(["--out", str(tmp_path / "file" / "w.json")])
    args, runner = parse_args(["--out", str(tmp_path / "w.json"), "--root", str(tmp_path), "--grid", "rate=0.2",
                               "--", "--dataset", "synthetic"])
    check_sweep("local", args, runner)  # accepted: the dry run wrote nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_runner_flags_in_either_form():
    assert has_flag(["--dataset", "synthetic", "--arch=test_vit"], "--arch")
    assert has_flag(["--arch", "x"], "--arch") and not has_flag(["--arch_width", "2"], "--arch")
    assert device_name(["--dataset", "synthetic", "--device", "cpu"]) == "cpu"
    assert device_name(["--dataset", "synthetic", "--device=cpu"]) == "cpu"
    assert (faster_or_slower(2.5), faster_or_slower(0.8)) == ("2.50x faster", "1.25x slower")


def test_a_refused_sweep_removes_no_earlier_measurement(tmp_path):
    """sweep.py --dry_run checks the grid and runner flags first: a typo stops the benchmark in one line and the
    folder of the earlier sweep stays as it was."""
    earlier = tmp_path / "wallclock_local" / "rate-0.2"
    earlier.mkdir(parents=True)
    (earlier / "metrics.jsonl").write_text("{}\n")
    args, runner = parse_args(["--out", str(tmp_path / "w.json"), "--root", str(tmp_path), "--grid", "rate=0.2",
                               "--", "--dataset", "synthetic", "--epoch", "2"])
    with pytest.raises(UsageError, match=r"^sweep\.py refuses the local sweep: runner flags: --epoch: unknown flag"):
        check_sweep("local", args, runner)
    assert (earlier / "metrics.jsonl").read_text() == "{}\n"
    assert main(["--out", str(tmp_path / "w.json"), "--root", str(tmp_path), "--executors", "local",
                 "--grid", "rate=0.2", "--", "--dataset", "synthetic", "--epoch", "2"]) == 2
    assert (earlier / "metrics.jsonl").read_text() == "{}\n" and not (tmp_path / "w.json").exists()


def write_output(path, flags, runner, sweeps, device="NVIDIA H200"):
    path.write_text(json.dumps({"device": device, "flags": flags, "runner_flags": runner, "sweeps": sweeps}))
    return str(path)


def test_merge_takes_the_sweeps_of_a_file_measured_alike(tmp_path):
    args, runner = parse_args(["--out", "x.json", "--executors", "fused", "--", "--dataset", "synthetic",
                               "--batch_size", "64"])
    flags = {k: v for k, v in vars(args).items() if k != "out"}
    local = {"wall_seconds": 10.0, "epochs": 1, "cells": 6, "processes": 6, "epoch_seconds_per_process": [1.0] * 6,
             "hours_at_target": 0.1}
    # the runner flags in another order are the same run; --epochs may differ (each sweep extrapolates its own)
    earlier = write_output(tmp_path / "local.json", dict(flags, executors=["local"], epochs=1),
                           ["--batch_size", "64", "--dataset", "synthetic"], {"local": local})
    assert merged_sweeps(earlier, flags, runner, ["fused"], "NVIDIA H200")["sweeps"] == {"local": local}
    merged = merged_sweeps(earlier, flags, runner, [], "cpu")  # nothing measured here: any device, the file's kept
    assert merged["sweeps"] == {"local": local} and merged["device"] == "NVIDIA H200"
    with pytest.raises(UsageError, match=r"local\.json: already has the local sweep this run measures$"):
        merged_sweeps(earlier, flags, runner, ["fused", "local"], "NVIDIA H200")
    with pytest.raises(UsageError, match=r"local\.json: measured with other rounds, runner flags, device than this "
                                         r"run$"):
        merged_sweeps(earlier, dict(flags, rounds=5), ["--dataset", "cifar10"], ["fused"], "NVIDIA H100 80GB HBM3")
    for name, text, why in (("bad.json", "{}", r"not an output of this benchmark \(KeyError\)"),
                            ("list.json", json.dumps({"device": "cpu", "flags": {}, "runner_flags": [],
                                                      "sweeps": [1]}), "not an output of this benchmark"),
                            ("README.md", "# not JSON", r"not an output of this benchmark \(JSONDecodeError\)")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match=rf"^--merge .*{name.replace('.', '[.]')}: {why}"):
            merged_sweeps(str(tmp_path / name), flags, runner, ["fused"], "cpu")
    with pytest.raises(UsageError, match=r"^--merge .*nope\.json: no such file$"):
        merged_sweeps(str(tmp_path / "nope.json"), flags, runner, ["fused"], "cpu")
    with pytest.raises(UsageError, match=r"^--merge .*: is a folder, expected a sweep_wallclock JSON file$"):
        merged_sweeps(str(tmp_path), flags, runner, ["fused"], "cpu")
    assert parse_args(["--out", "x.json", "--executors", "", "--merge", earlier])[0].executors == []


def test_a_merge_of_sweeps_at_different_epochs_compares_estimates_only(tmp_path, capsys):
    """Sweeps measured at other --epochs a round (e.g. a 1-epoch local sweep from an earlier call, whose file
    predates the per-sweep record: its epochs come from its flags) join as estimates: the ratio of the hours at
    --target_epochs is given, the measured wall clocks are not compared, and the record says why."""
    runner = ["--dataset", "synthetic", "--batch_size", "64"]
    args, _ = parse_args(["--out", "x.json", "--", *runner])
    flags = {k: v for k, v in vars(args).items() if k != "out"}
    fused = {"wall_seconds": 200.0, "epochs": 2, "cells": 6, "processes": 1, "epoch_seconds_per_process": [2.0],
             "hours_at_target": 0.3}
    local = {"wall_seconds": 270.0, "cells": 6, "processes": 6, "epoch_seconds_per_process": [0.8] * 6,
             "hours_at_target": 0.6}  # no "epochs": written before sweeps recorded theirs
    both = write_output(tmp_path / "both.json", dict(flags, epochs=1), [*runner, "--arch", "res20s", "--no_wandb"],
                        {"fused": fused, "local": local})
    assert merged_sweeps(both, flags, [*runner, "--arch", "res20s", "--no_wandb"], [],
                         "cpu")["sweeps"]["local"]["epochs"] == 1
    out = tmp_path / "w.json"
    assert main(["--out", str(out), "--executors", "", "--merge", both, "--", *runner]) == 0
    record = json.loads(out.read_text())
    assert record["fused_speedup"] == pytest.approx(2.0) and "fused_speedup_measured" not in record
    assert record["epochs_differ"] == {"fused": 2, "local": 1}
    assert ("fused: 2.00x faster at 20 epochs a round (the sweeps were measured at different epochs a round, "
            "fused 2, local 1:") in capsys.readouterr().out


def test_defaults_and_runner_flags_after_the_separator():
    args, runner = parse_args(["--out", "x.json", "--", "--dataset", "synthetic"])
    assert args.grid == ["criteria=remain,magnitude,l1", "rate=0.2,0.3"] and args.executors == ["fused", "local"]
    assert (args.rounds, args.epochs, args.target_epochs, args.fuse) == (20, 2, 20, 8)
    assert runner == ["--dataset", "synthetic"]


@pytest.mark.slow
def test_fused_and_local_sweeps_on_synthetic_data(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "w.json"
    code = main(["--out", str(out), "--root", str(tmp_path / "runs"), "--rounds", "1", "--grid", "rate=0.2,0.3",
                 "--target_epochs", "3", "--", "--dataset", "synthetic", "--batch_size", "128"])
    assert code == 0
    record = json.loads(out.read_text())
    fused, local = record["sweeps"]["fused"], record["sweeps"]["local"]
    assert (fused["cells"], fused["processes"], local["cells"], local["processes"]) == (2, 1, 2, 2)
    assert set(fused["epoch_seconds_per_cell"]) == {"rate-0.2", "rate-0.3"}
    # two epochs a round measured (the default), 3 wanted: 1 round x 1 more epoch of each sequential process
    for sweep in (fused, local):
        assert sweep["epochs"] == 2
        assert sweep["hours_at_target"] == pytest.approx(
            (sweep["wall_seconds"] + sum(sweep["epoch_seconds_per_process"])) / 3600)
    assert record["runner_flags"].count("--no_wandb") == 1
    assert fused["epoch_seconds_per_process"] == [max(fused["epoch_seconds_per_cell"].values())]
    assert record["fused_speedup"] == pytest.approx(local["hours_at_target"] / fused["hours_at_target"])
    for cell in ("rate-0.2", "rate-0.3"):
        assert (tmp_path / "runs" / "wallclock_fused" / cell / "0checkpoint.pth.tar").is_file()
        assert (tmp_path / "runs" / "wallclock_local" / cell / "0checkpoint.pth.tar").is_file()
