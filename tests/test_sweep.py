"""sweep.py: grid expansion and names, refusals before any work, skip / resume, the local pool, submitit."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from sweeps import cells, grid, plan, record
from sweeps.cli import main
from utils import paths
from utils.errors import UsageError
from utils.lock import RunLock

RUNNER = ["--dataset", "synthetic", "--arch", "test_vit", "--no_wandb", "--no_progress", "--batch_size", "64",
          "--lr", "0.05", "--struct", "none", "--pruning_times", "2", "--epochs", "1", "--val_size", "2400",
          "--deterministic"]  # 9 steps an epoch: a cell takes a few seconds
GRID = ["--grid", "rate=0.3,0.5", "--grid", "seed=1,2"]
NAMES = ["rate-0.3_seed-1", "rate-0.3_seed-2", "rate-0.5_seed-1", "rate-0.5_seed-2"]
# one torch thread in every cell, so a resumed cell matches the reference bit for bit
ENV = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def sweep(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def start_sweep(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "sweep.py"), *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_epoch(run_dir, timeout=240):
    """Block until the run dir's metrics.jsonl holds a finished epoch; returns the runner's pid (its lock)."""
    deadline, metrics = time.time() + timeout, os.path.join(run_dir, "metrics.jsonl")
    while time.time() < deadline:
        if os.path.exists(metrics) and '"epoch"' in open(metrics).read():
            return json.load(open(os.path.join(run_dir, ".lock")))["pid"]
        time.sleep(0.05)
    raise AssertionError(f"{run_dir}: no epoch finished in {timeout} s")


def assert_same_rounds(ours, reference):
    """Every round checkpoint has the same weights and masks, lineage.json the same numbers."""
    for index in (0, 1):
        mine = torch.load(os.path.join(ours, f"{index}checkpoint.pth.tar"), weights_only=True)
        theirs = torch.load(os.path.join(reference, f"{index}checkpoint.pth.tar"), weights_only=True)
        for part in ("model", "masks"):
            assert mine[part].keys() == theirs[part].keys()
            for name, tensor in theirs[part].items():
                assert torch.equal(mine[part][name], tensor), f"round {index} {part} {name}"
    numbers = lambda d: [(r["round"], r["val_top1"], r["test_top1"], r["remaining_pct"])  # noqa: E731
                         for r in json.load(open(os.path.join(d, "lineage.json")))["rounds"]]
    assert numbers(ours) == numbers(reference) and len(numbers(ours)) == 2


# ---- pure: grid, names, commands -----------------------------------------------------------------------
def test_grid_expands_in_flag_order_with_deterministic_names_and_commands():
    g = grid.parse_grid(["criteria=remain,magnitude,l1", "rate=0.2,0.3", "seed=1,2"])
    points = grid.expand(g)
    assert len(points) == 12 and points[0] == {"criteria": "remain", "rate": "0.2", "seed": "1"}
    assert points[1] == {"criteria": "remain", "rate": "0.2", "seed": "2"}  # the last key varies fastest
    assert points[-1] == {"criteria": "l1", "rate": "0.3", "seed": "2"}
    assert grid.cell_name(points[0]) == "criteria-remain_rate-0.2_seed-1"
    assert grid.cell_name({"decreasing_lr": "60 90", "data": "a/b"}) == "decreasing_lr-60-90_data-a-b"
    long = grid.cell_name({"exp_name": "x" * 300})
    assert len(long) == grid.MAX_NAME and long == grid.cell_name({"exp_name": "x" * 300})
    assert grid.cell_command(["--arch", "res20s"], {"vit_structured": "true", "rate": "0.2"}, "r/c",
                             booleans=["vit_structured"]) == [
        "python", "main_imp_fillback.py", "--arch", "res20s", "--vit_structured", "--rate", "0.2",
        "--save_dir", "r/c", "--resume"]
    assert grid.value_flags({"vit_structured": "false"}, ["vit_structured"]) == []
    with pytest.raises(UsageError, match="would share the run dir name a-b"):
        grid.check_unique_names([{"a": "b"}, {"a": "b"}])


@pytest.mark.parametrize("texts, message", [
    (["rate"], "--grid rate: expected key=value1,value2"),
    (["rate=0.2,,0.3"], "--grid rate=0.2,,0.3: empty value"),
    (["rate=0.2", "rate=0.3"], "--grid rate=0.3: key rate is given twice"),
    (["seed=1,2,1"], "--grid seed=1,2,1: value 1 is given twice"),
])
def test_malformed_grid_texts_are_refused(texts, message):
    with pytest.raises(UsageError) as error:
        grid.parse_grid(texts)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("args, message", [
    (["--grid", "rates=0.2,0.3", "--", *RUNNER], "error: --grid rates=0.2,0.3: --rates is not a flag of "
                                                 "main_imp_fillback.py (did you mean rate?)"),
    (["--grid", "rate=0.2,1.5", "--", *RUNNER], "error: --grid rate=0.2,1.5 (cell rate-1.5): --rate 1.5: must be"),
    (["--grid", "warmup=0,x", "--", *RUNNER], "error: --grid warmup=0,x (cell warmup-x): argument --warmup: "
                                              "invalid int value: 'x'"),
    (["--grid", "seed=1,2", "--", *RUNNER, "--seed", "3"], "error: --grid seed=1,2: --seed is also in the runner"),
    (["--grid", "vit_structured=true,yes", "--", *RUNNER], "error: --grid vit_structured=yes: --vit_structured is "
                                                          "an on/off flag; its grid values are true and false"),
    (["--grid", "vit_structured=true,false", "--", *RUNNER], "error: --grid vit_structured=true,false (cell "
                                                            "vit_structured-true): --vit_structured: not used"),
    (["--grid", "save_dir=a,b", "--", *RUNNER], "error: --grid save_dir=a,b: --save_dir is set by sweep.py"),
    (["--grid", "seed=1", "--", *RUNNER, "--save_dir", "x"], "error: runner flags: --save_dir is set by sweep.py"),
    (["--grid", "seed=1", "--", *RUNNER, "--epochs", "0"], "error: runner flags (cell seed-1): --epochs 0: must be"),
    (["--grid", "seed=1", "--name", "a/b", "--", *RUNNER], "error: --name 'a/b': use letters"),
    (["--grid", "seed=1", "--executor", "pbs", "--", *RUNNER], "error: --executor: unknown executor 'pbs'; choose "
                                                               "from fused, local, slurm, submitit_local"),
    (["--grid", "seed=1", "--parallel", "0", "--", *RUNNER], "error: --parallel 0: must be at least 1"),
    (["--", *RUNNER], "error: --grid: give at least one"),
    (["--grid", "rate=0.2,0.20", "--", *RUNNER], "error: --grid rate=0.2,0.20: rate=0.20 gives the same runner "
                                                 "config as rate=0.2 (cell rate-0.2), so one experiment would run"),
    (["--grid", "seed=1,2", "--grid", "exp_name=a,b", "--", *RUNNER], "error: --grid exp_name=a,b: exp_name=b gives "
     "the same runner config as exp_name=a (cell seed-1_exp_name-a), so"),  # exp_name only labels a run
])
def test_bad_sweep_is_refused_in_one_line_before_anything_is_written(args, message, tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["--root", str(root), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not root.exists()


def test_sweep_json_is_reused_and_another_grid_under_the_same_name_is_refused(tmp_path, capsys):
    root = str(tmp_path / "runs")
    built = plan.build(grid.parse_grid(["rate=0.3,0.5"]), RUNNER, root, "s")
    assert record.check_existing(built) is None
    record.write(built, "local", None)
    stored = json.load(open(paths.sweep_file(built.folder)))
    assert stored["grid"] == {"rate": ["0.3", "0.5"]} and stored["runner_flags"] == RUNNER
    assert [c["run_dir"] for c in stored["cells"]] == ["rate-0.3", "rate-0.5"]
    assert stored["cells"][0]["command"][-5:] == ["--rate", "0.3", "--save_dir", os.path.join(root, "s", "rate-0.3"),
                                                  "--resume"]
    reordered = plan.build(grid.parse_grid(["rate=0.5,0.3"]), RUNNER, root, "s")
    assert record.check_existing(reordered) == stored  # the same cells: the same sweep
    record.write(reordered, "slurm", stored)
    assert json.load(open(paths.sweep_file(built.folder))) == dict(stored, executor="slurm")
    extended = plan.build(grid.parse_grid(["rate=0.3,0.4"]), RUNNER, root, "s")
    assert record.check_existing(extended) == dict(stored, executor="slurm")  # other values extend the sweep
    with pytest.raises(UsageError, match=r"sweep.json: sweep 's' was made with the grid keys \['rate'\], not "
                                         r"\['rate', 'seed'\]; extending a key's values is allowed, but the grid "
                                         r"keys and runner flags must match: use another --name"):
        record.check_existing(plan.build(grid.parse_grid(["rate=0.3", "seed=1"]), RUNNER, root, "s"))
    with pytest.raises(UsageError, match=r"was made with runner flags .*; extending a key's values is allowed"):
        record.check_existing(plan.build(grid.parse_grid(["rate=0.3,0.5"]), [*RUNNER, "--lr", "0.1"], root, "s"))
    assert main(["--root", str(tmp_path / "dry"), "--grid", "rate=0.3", "--dry_run", "--", *RUNNER]) == 0
    out = capsys.readouterr().out
    assert "sweep sweep-rate: 1 cell (1 new) in" in out and "rate-0.3 [new]: python main_imp_fillback.py" in out
    assert not (tmp_path / "dry").exists()


def _lineage(directory, rounds, touch=True):
    os.makedirs(directory, exist_ok=True)
    entries = [{"round": r, "val_top1": v, "test_top1": t} for r, v, t in rounds]
    with open(os.path.join(directory, "lineage.json"), "w") as f:
        json.dump({"rounds": entries}, f)
    for r, _, _ in rounds if touch else ():
        open(os.path.join(directory, f"{r}checkpoint.pth.tar"), "w").close()


def test_cell_state_from_plain_files(tmp_path):
    d = str(tmp_path / "cell")
    assert cells.cell_state(d, 2).state == "new"
    os.makedirs(d)
    assert cells.cell_state(d, 2) == cells.CellState("interrupted", [])
    _lineage(d, [(0, 40.0, 41.0)])
    assert cells.cell_state(d, 2).state == "interrupted"
    _lineage(d, [(0, 40.0, 41.0), (1, 42.0, 39.0), (2, 42.0, 38.0)])
    state = cells.cell_state(d, 3)
    assert state.state == "finished" and state.rounds == [0, 1, 2]
    assert state.best == {"round": 2, "val_top1": 42.0, "test_top1": 38.0}  # ties: the later round
    assert cells.cell_state(d, 4).state == "interrupted"  # --pruning_times raised: the runner continues
    os.unlink(os.path.join(d, "1checkpoint.pth.tar"))  # listed, but its checkpoint is gone
    assert cells.cell_state(d, 3).state == "interrupted" and cells.cell_state(d, 3).rounds == [0, 2]
    branch = str(tmp_path / "branch")
    _lineage(branch, [(3, 40.0, 41.0), (4, 41.0, 40.0)])  # a --resume_from branch starts at round 3
    assert cells.cell_state(branch, 5).state == "finished"
    with open(os.path.join(d, "lineage.json"), "w") as f:
        f.write("{trunc")
    assert cells.cell_state(d, 3) == cells.CellState("interrupted", [])
    with RunLock(d, command=["main_imp_fillback.py", "--save_dir", d]):
        locked = cells.cell_state(d, 3)
        assert locked.state == "locked" and f"pid {os.getpid()}" in locked.note
    assert cells.cell_state(d, 3).state == "interrupted"  # a released (or dead holder's) lock is no lock


def test_slurm_executor_submits_one_array_and_skips_queued_cells(tmp_path, monkeypatch, capsys):
    """Without Slurm here: fake sbatch / srun / squeue on PATH; the sbatch file and the pickled jobs are real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"sbatch": f'cp "$1" {bin_dir}/submitted.sh; echo "Submitted batch job 4242"',
               "srun": "exit 0", "squeue": "echo 4242_0"}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # the executor extends it: undone here
    root = tmp_path / "runs"
    args = ["--root", str(root), "--name", "s", "--grid", "seed=1,2", "--executor", "slurm", "--slurm_partition",
            "gpu", "--slurm_account", "lab", "--slurm_array_parallelism", "1", "--timeout_min", "60", "--", *RUNNER]
    assert main(args) == 0
    sbatch = (bin_dir / "submitted.sh").read_text()
    for line in ("--array=0-1%1", "--partition=gpu", "--account=lab", "--signal=USR2@90", "--time=60",
                 "--gpus-per-node=1"):
        assert f"#SBATCH {line}\n" in sbatch
    jobs = json.load(open(root / "s" / "jobs.json"))["submissions"]
    assert jobs[0]["jobs"] == [{"cell": "seed-1", "job_id": "4242_0"}, {"cell": "seed-2", "job_id": "4242_1"}]
    import cloudpickle
    with open(root / "s" / "slurm" / "4242_1" / "4242_1_submitted.pkl", "rb") as f:
        job = cloudpickle.load(f).function
    assert job.spec["name"] == "seed-2"
    assert job.spec["argv"][-3:] == ["--save_dir", str(root / "s" / "seed-2"), "--resume"]
    assert job.spec["forward_sigterm"] is False and job.spec["stop_wait_s"] == 75
    capsys.readouterr()
    assert main(args) == 0  # squeue still lists 4242_0: only seed-2 is submitted again
    out = capsys.readouterr().out
    assert "skip seed-1: job 4242_0 is still queued or running" in out and "submitted seed-2" in out
    assert json.load(open(root / "s" / "jobs.json"))["submissions"][1]["jobs"] == [{"cell": "seed-2",
                                                                                     "job_id": "4242"}]


def test_local_pool_keeps_going_past_a_failing_cell(tmp_path, monkeypatch, capsys):
    """Cells are stand-in scripts here: one fails with exit 3, the others still run (one pool slot)."""
    from sweeps import local
    scripts = {"a": "import sys; sys.exit(3)", "b": "print('ran b')", "c": "print('ran c')"}
    monkeypatch.setattr(local, "runner_argv", lambda cell: [sys.executable, "-c", scripts[cell.name]])
    todo = [plan.Cell(name, {}, ["python", "x.py"], str(tmp_path / name), 1) for name in scripts]
    built = plan.Sweep("s", str(tmp_path), {}, [], todo)
    pool = local.LocalPool(type("Options", (), {"parallel": 1})())
    assert pool.launch(built, todo, dict.fromkeys(scripts, "new")) == {"a": 3, "b": 0, "c": 0}
    assert "ran c" in (tmp_path / "logs" / "c.log").read_text()
    assert "end a: exit code 3" in capsys.readouterr().out


# a stand-in runner (argv: run dir): writes what a finished 2-round run leaves (lineage.json, numbered checkpoints)
FINISH_CELL = ("import json, os, sys; d = sys.argv[1]; os.makedirs(d, exist_ok=True); "
               "json.dump({'rounds': [{'round': r, 'val_top1': 40.0 + r, 'test_top1': 39.0} for r in (0, 1)]}, "
               "open(os.path.join(d, 'lineage.json'), 'w')); "
               "[open(os.path.join(d, f'{r}checkpoint.pth.tar'), 'w').close() for r in (0, 1)]")


def test_a_grid_with_new_values_extends_the_sweep_and_one_with_fewer_keeps_sweep_json(tmp_path, monkeypatch, capsys):
    from sweeps import local
    monkeypatch.setattr(local, "runner_argv", lambda cell: [sys.executable, "-c", FINISH_CELL, cell.run_dir])
    root, folder = tmp_path / "runs", tmp_path / "runs" / "s"
    sweep_args = lambda *grids: ["--root", str(root), "--name", "s", *grids, "--", *RUNNER]  # noqa: E731
    assert main(sweep_args("--grid", "rate=0.3", "--grid", "seed=1,2")) == 0
    first = json.load(open(folder / "sweep.json"))
    kept = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and "seed-" in p.parent.name}
    capsys.readouterr()
    # new values for both keys, the keys in the other order: the stored cells keep their names and run dirs
    assert main(sweep_args("--grid", "seed=3,1,2", "--grid", "rate=0.5,0.3")) == 0
    out = capsys.readouterr().out
    assert "sweep s: 6 cells (2 finished, 4 new)" in out and "sweep s: this grid adds 4 new cells to sweep.json" in out
    assert [line for line in out.splitlines() if line.startswith(("skip ", "start "))] == [
        "skip rate-0.3_seed-1: finished (2/2 rounds)", "skip rate-0.3_seed-2: finished (2/2 rounds)",
        *(f"start {n} (new): log {folder / 'logs' / n}.log" for n in
          ("rate-0.5_seed-3", "rate-0.5_seed-1", "rate-0.5_seed-2", "rate-0.3_seed-3"))]  # in the order given
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    extended = json.load(open(folder / "sweep.json"))
    assert extended["grid"] == {"rate": ["0.3", "0.5"], "seed": ["1", "2", "3"]}
    assert [c["name"] for c in extended["cells"]] == [f"rate-{r}_seed-{s}" for r in ("0.3", "0.5") for s in "123"]
    assert extended["cells"][:2] == first["cells"] and extended["runner_flags"] == first["runner_flags"]
    assert extended["cells"][2]["command"][-7:] == ["--rate", "0.3", "--seed", "3", "--save_dir",
                                                    str(folder / "rate-0.3_seed-3"), "--resume"]
    text = (folder / "sweep.json").read_text()
    # fewer values: only this grid's cells run; sweep.json keeps every cell ever made, unchanged
    assert main(sweep_args("--grid", "rate=0.5", "--grid", "seed=1")) == 0
    out = capsys.readouterr().out
    assert "sweep s: 1 cell (1 finished) in" in out
    assert ("sweep s: 5 cells of sweep.json not in this grid (rate-0.3_seed-1, rate-0.3_seed-2, rate-0.3_seed-3, "
            "...): kept in sweep.json, not run now\n") in out
    assert (folder / "sweep.json").read_text() == text
    # other keys, other runner flags, or a new value that repeats a stored cell's experiment: refused, nothing written
    for args, message in [
        (sweep_args("--grid", "rate=0.3", "--grid", "seed=1", "--grid", "momentum=0.8"), "was made with the grid "
         "keys ['rate', 'seed'], not ['rate', 'seed', 'momentum']; extending a key's values is allowed, but the grid keys and "
         "runner flags must match: use another --name"),
        ([*sweep_args("--grid", "rate=0.3", "--grid", "seed=1"), "--momentum", "0.8"], "was made with runner flags"),
        (sweep_args("--grid", "rate=0.30", "--grid", "seed=1"), "error: --grid rate=0.30: rate=0.30 gives the same "
         "runner config as rate=0.3 (cell rate-0.3_seed-1 of sweep.json)"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert (folder / "sweep.json").read_text() == text and not (folder / "rate-0.30_seed-1").exists()


def test_submitit_local_leaves_no_folder_named_after_the_job_id_template(tmp_path, monkeypatch):
    """submitit's local controller creates its folder unformatted: `<sweep>/slurm/%j` must not be that folder."""
    pytest.importorskip("submitit")
    from sweeps import slurm
    from sweeps.cli import build_parser
    monkeypatch.setattr(slurm, "runner_argv", lambda cell: [sys.executable, "-c", "print('ran', 'cell')"])
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # the executor extends it: undone here
    cell = plan.Cell("a", {}, ["python", "x.py"], str(tmp_path / "a"), 1)
    built = plan.Sweep("s", str(tmp_path / "s"), {}, [], [cell])
    executor = slurm.SubmititLocal(build_parser().parse_args(["--executor", "submitit_local", "--wait"]))
    assert executor.launch(built, [cell], {"a": "new"}) == {"a": 0}
    made = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")]
    assert not [p for p in made if "%" in p], made
    job = json.load(open(tmp_path / "s" / "jobs.json"))["submissions"][0]["jobs"][0]["job_id"]
    assert f"s/slurm/{job}_0_log.out" in made and "ran cell" in (tmp_path / "s" / "logs" / "a.log").read_text()


# ---- end to end: the local pool, resume, submitit ---------------------------------------------------------
@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """The 2 x 2 grid run by the local pool, 2 cells at a time (the reference for the resume tests)."""
    root = tmp_path_factory.mktemp("sweeps")
    first = sweep("--root", root, "--name", "ref", "--parallel", 2, *GRID, "--", *RUNNER)
    return root / "ref", first


def test_local_pool_runs_four_cells_two_at_a_time_then_skips_them_all(finished_sweep, capsys):
    folder, first = finished_sweep
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("start ") == 4 and first.stdout.count("exit code 0") == 4
    rows = [line.split() for line in first.stdout.splitlines() if line.startswith("rate-")]
    assert [r[:4] for r in rows if len(r) == 7] == [[n, "new", "0", "2/2"] for n in NAMES]
    for name in NAMES:
        assert (folder / name / "1checkpoint.pth.tar").is_file()
        assert "starting a new run from round 0" in (folder / "logs" / f"{name}.log").read_text()
    assert [c["name"] for c in json.load(open(folder / "sweep.json"))["cells"]] == NAMES
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    assert main(["--root", str(folder.parent), "--name", "ref", "--parallel", "2", *GRID, "--", *RUNNER]) == 0
    again = capsys.readouterr().out
    assert [line for line in again.splitlines() if line.startswith("skip ")] == [
        f"skip {n}: finished (2/2 rounds)" for n in NAMES]
    assert "start " not in again and "sweep ref: 4 finished" in again
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before


def test_an_interrupted_cell_is_resumed_to_the_uninterrupted_result(finished_sweep, tmp_path, one_thread, capsys):
    """A cell whose run dir holds round 0 only (made here by the runner with --pruning_times 1) is resumed by
    the sweep, which runs round 1: the result equals the cell the sweep ran in one go."""
    from utils.cli import main as runner_main
    folder, _ = finished_sweep
    cell = tmp_path / "ref" / "rate-0.3_seed-1"
    assert runner_main([*RUNNER, "--rate", "0.3", "--seed", "1", "--pruning_times", "1", "--save_dir", str(cell)]) == 0
    assert cells.cell_state(str(cell), 2).state == "interrupted"
    capsys.readouterr()
    resumed = sweep("--root", tmp_path, "--name", "ref", "--grid", "rate=0.3", "--grid", "seed=1", "--", *RUNNER)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "start rate-0.3_seed-1 (interrupted)" in resumed.stdout
    assert "resuming from" in (tmp_path / "ref" / "logs" / "rate-0.3_seed-1.log").read_text()
    assert_same_rounds(cell, folder / "rate-0.3_seed-1")


@pytest.mark.slow
def test_sigterm_stops_the_pool_and_the_next_sweep_resumes_to_the_uninterrupted_result(finished_sweep, tmp_path):
    folder, _ = finished_sweep
    args = ["--root", tmp_path, "--name", "ref", "--grid", "rate=0.3", "--grid", "seed=1", "--", *RUNNER]
    running = start_sweep(*args)
    wait_for_epoch(tmp_path / "ref" / "rate-0.3_seed-1")
    running.send_signal(signal.SIGTERM)
    out = running.communicate(timeout=120)[0]
    assert running.returncode == 1, out
    assert "end rate-0.3_seed-1: exit code 143" in out and "1 interrupted" in out
    resumed = sweep(*args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "start rate-0.3_seed-1 (interrupted)" in resumed.stdout
    assert "resuming from" in (tmp_path / "ref" / "logs" / "rate-0.3_seed-1.log").read_text()
    assert_same_rounds(tmp_path / "ref" / "rate-0.3_seed-1", folder / "rate-0.3_seed-1")


@pytest.mark.slow
def test_submitit_local_job_preempted_is_requeued_and_resumes(finished_sweep, tmp_path):
    """The job process gets submitit's preemption signal (USR2, what `LocalJob._interrupt()` means to send; in
    submitit 1.5.4 that method signals the controller instead, which then dies): CellJob.checkpoint() stops
    the runner (it saves), the job is requeued, and the requeued job resumes to the uninterrupted result."""
    pytest.importorskip("submitit")
    folder, _ = finished_sweep
    args = ["--root", tmp_path, "--name", "ref", "--grid", "rate=0.5", "--grid", "seed=2", "--executor",
            "submitit_local", "--wait", "--timeout_min", 30, "--", *RUNNER]
    running = start_sweep(*args)
    runner_pid = wait_for_epoch(tmp_path / "ref" / "rate-0.5_seed-2")
    with open(f"/proc/{runner_pid}/stat") as f:
        job_pid = int(f.read().rsplit(")", 1)[1].split()[1])
    os.kill(job_pid, signal.SIGUSR2)
    out = running.communicate(timeout=300)[0]
    assert running.returncode == 0, out
    log = (tmp_path / "ref" / "logs" / "rate-0.5_seed-2.log").read_text()
    assert "stopped by SIGTERM" in log and "resuming from" in log and log.count("submitit job") == 2
    jobs = json.load(open(tmp_path / "ref" / "jobs.json"))["submissions"]
    assert [j["cell"] for j in jobs[0]["jobs"]] == ["rate-0.5_seed-2"]
    assert_same_rounds(tmp_path / "ref" / "rate-0.5_seed-2", folder / "rate-0.5_seed-2")


def test_rounds_column_counts_the_plan_and_what_lies_past_it():
    """The table's rounds: done/planned from the first recorded round (a branch starts past 0), rounds past
    pruning_times as +N (was `3/2` for a run dir trained one round further, `2/5` for a finished branch)."""
    from sweeps.summary import rounds_text
    assert rounds_text([0, 1], 2) == "2/2" and rounds_text([0], 2) == "1/2" and rounds_text([], 3) == "0/3"
    assert rounds_text([0, 1, 2], 2) == "2/2 +1"
    assert rounds_text([3, 4], 5) == "2/2" and rounds_text([3], 5) == "1/2"
