"""`main_imp_fillback.py ... --fused_grid KEY=V1,V2` (training/fused/grid_flag.py): a grid's cells trained fused in
the runner's own process, each in <--save_dir>/<cell name>, as sweep.py --executor fused would leave them.

test_vit (the streams route under auto) in fp32 follows its separate runs to about 1e-7 relative (docs/fused.md)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_refused, read_jsonl
from training.fused import grid_flag
from training.fused.runner import LockstepDriver
from utils import checkpoint, paths
from utils.cli import main, parse_config
from utils.errors import UsageError

pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]
BASE = ["--dataset", "synthetic", "--arch", "test_vit", "--no_wandb", "--no_progress", "--batch_size", "64",
        "--struct", "rsst", "--vit_structured", "--criteria", "saliency", "--rate", "0.5", "--pruning_times", "2",
        "--epochs", "1", "--val_size", "2400", "--deterministic", "--checkpoint_interval", "0"]
GRID = ["--fused_grid", "lr=0.05,0.03", "--fused_grid", "weight_decay=0,5e-4"]
NAMES = ["lr-0.05_weight_decay-0", "lr-0.05_weight_decay-5e-4", "lr-0.03_weight_decay-0", "lr-0.03_weight_decay-5e-4"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def drop(flags, *names):
    """`flags` without the flags `names` and their values."""
    out = list(flags)
    for name in names:
        at = out.index(name)
        del out[at:at + 2]
    return out


def records(directory):
    """metrics.jsonl without wall times and paths."""
    keep = ("type", "round", "epoch", "train_loss", "train_top1", "val_top1", "test_top1", "remaining_pct")
    return [{k: r.get(k) for k in keep} for r in read_jsonl(paths.metrics_file(str(directory)))]


def assert_same_run(ours, theirs, rel):
    """Equal masks, accuracies and sparsity per round; losses and weights within `rel` (0: bit for bit)."""
    for k in range(2):
        mine, other = checkpoint.load(paths.round_checkpoint(str(ours), k)), \
            checkpoint.load(paths.round_checkpoint(str(theirs), k))
        assert mine["masks"].keys() == other["masks"].keys()
        assert all(torch.equal(mine["masks"][n], m) for n, m in other["masks"].items()), f"round {k} masks"
        for name, tensor in other["model"].items():
            assert torch.allclose(mine["model"][name], tensor, rtol=0, atol=1e-4 if rel else 0), name
    a, b = records(ours), records(theirs)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        loss, reference = x.pop("train_loss"), y.pop("train_loss")
        assert abs(loss - reference) <= rel * abs(reference), (loss, reference)
        assert x == y


@pytest.fixture(scope="module")
def two_cells(tmp_path_factory, one_thread):
    """`--fused_grid lr=0.05,0.03` (2 rounds x 1 epoch) under --save_dir, and the two cells run separately."""
    base = tmp_path_factory.mktemp("grid")
    assert main([*BASE, "--save_dir", str(base / "g"), "--fused_grid", "lr=0.05,0.03"]) == 0
    for lr in ("0.05", "0.03"):
        assert main([*BASE, "--lr", lr, "--save_dir", str(base / "separate" / f"lr-{lr}")]) == 0
    return base


# ---- planning (no training) ------------------------------------------------------------------------------------
def test_cells_are_the_grid_product_in_their_own_run_dirs(tmp_path):
    grid = grid_flag.plan_cells([*BASE, "--save_dir", str(tmp_path / "g"), *GRID])
    assert [c.name for c in grid.cells] == NAMES and grid.parent == str(tmp_path / "g") and not grid.resume
    assert [c.run_dir for c in grid.cells] == [str(tmp_path / "g" / n) for n in NAMES]
    config = parse_config(grid.cells[3].argv)
    assert (config.lr, config.weight_decay, config.resume) == (0.03, 5e-4, False)
    assert config.save_dir == grid.cells[3].run_dir
    assert [c.state.state for c in grid.cells] == ["new"] * 4
    resumed = grid_flag.plan_cells([*BASE, "--resume", "--save_dir", str(tmp_path / "g"), *GRID])
    assert resumed.resume and all(parse_config(c.argv).resume for c in resumed.cells)
    assert not os.path.exists(tmp_path / "g")


def test_without_save_dir_the_default_run_dir_is_the_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = grid_flag.plan_cells([*BASE, "--exp_name", "x", "--fused_grid=seed=1,2"])
    assert grid.parent == "synthetic_rsst_output_x"
    assert [c.run_dir for c in grid.cells] == [os.path.join(".", "synthetic_rsst_output_x", f"seed-{s}")
                                               for s in (1, 2)]
    assert os.listdir(tmp_path) == []


def test_group_exit_code():
    """One policy for both entries (the fused group process and --fused_grid): 0 all done, 128 + signal when a
    stop signal ended the group, else the highest cell code."""
    driver = LockstepDriver([[], []])
    assert driver.exit_code([0, 0]) == 0 and driver.exit_code([0, 3]) == 3 and driver.exit_code([2, 3, 1]) == 3
    assert driver.exit_code([]) == 0
    driver.stop.signum = 15
    assert driver.exit_code([0, 0]) == 0 and driver.exit_code([143, 3]) == 143 and driver.exit_code([0, 1]) == 143


@pytest.mark.parametrize("extra, message", [
    (["--fused_grid", "momentum=0.9,0.8"], "error: --fused_grid momentum=0.9,0.8: cells would differ in --momentum "
     "0.9 vs 0.8, which fused cells share (training/fused/cells.py SHARED_FIELDS); run such a grid with sweep.py "
     "--executor fused"),
    (["--fused_grid", "batch_size=32,64"], "error: --fused_grid batch_size=32,64: cells would differ in --batch_size "
     "32 vs 64, which fused cells share (training/fused/cells.py SHARED_FIELDS)"),
    # the real reason first, not "--batch_size is also in the runner flags" (a fresh user's trial)
    (["--fused_grid", "batch_size=32,64", "--batch_size", "64"], "error: --fused_grid batch_size=32,64: cells would "
     "differ in --batch_size 32 vs 64, which fused cells share"),
    (["--fused_grid", "arch=test_vit,res20s"], "error: --fused_grid arch=test_vit,res20s: cells would differ in "
     "--arch test_vit vs res20s"),
    (["--fused_grid", "no_cuda_graph=true,false"], "error: --fused_grid no_cuda_graph=true,false: cells would differ "
     "in --cuda_graph"),
    (["--fused_grid", "sead=1,2"], "error: --fused_grid sead=1,2: --sead is not a flag of main_imp_fillback.py "
     "(did you mean seed?)"),
    (["--fused_grid", "seed=1,x"], "error: --fused_grid seed=1,x (cell seed-x): argument --seed: invalid int value"),
    (["--fused_grid", "rate=0.5,1.5"], "error: --fused_grid rate=0.5,1.5 (cell rate-1.5): --rate 1.5: must be between"),
    (["--fused_grid", "seed="], "error: --fused_grid seed=: empty value"),
    (["--fused_grid", "seed=1,,2"], "error: --fused_grid seed=1,,2: empty value"),
    (["--fused_grid", "seed=1,2,1"], "error: --fused_grid seed=1,2,1: value 1 is given twice"),
    (["--fused_grid", "seed=1", "--fused_grid", "seed=2"], "error: --fused_grid seed=2: key seed is given twice"),
    (["--fused_grid", "seed=1,01"], "error: --fused_grid seed=1,01: seed=01 gives the same runner config as seed=1"),
    (["--fused_grid", "seed=1,2", "--seed", "3"], "error: --fused_grid seed=1,2: --seed is also in the runner flags"),
    (["--fused_grid", "resume=true,false"], "error: --fused_grid resume=true,false: --resume is not a cell value"),
    (["--fused_grid", "nan_policy=stop,skip_batch"], "error: --fused_grid nan_policy=stop,skip_batch: cells would "
     "differ in --nan_policy stop vs skip_batch"),
    (["--fused_grid", "seed=1,2", "--epochs", "0"], "error: runner flags (cell seed-1): --epochs 0: must be at "
     "least 1"),
    (["--fused_grid"], "error: --fused_grid: expected a value"),
    (["--fused_grid", "seed=1,2", "--arch", "res20s", "--fused_route", "vmap"], "error: --fused_grid (cell seed-1): "
     "--fused_route vmap with --arch res20s: vmap fusion cannot update BatchNorm running statistics; use "
     "--fused_route auto or streams"),
])
def test_bad_grids_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys, extra, message):
    assert_refused([*drop(BASE, "--batch_size", "--arch", "--rate"), *extra], str(tmp_path / "g"), capsys, message)


def test_fused_grid_is_not_a_flag_of_one_cell():
    with pytest.raises(UsageError, match="^--fused_grid: not a flag of one run"):
        parse_config([*BASE, "--fused_grid", "seed=1,2"])


# ---- training -----------------------------------------------------------------------------------------------------
def test_fused_grid_cells_match_their_separate_runs(two_cells):
    """The documented tolerance: losses within 1e-5 relative, weights within 1e-4; identical masks, accuracies,
    sparsity; the files of a separate run."""
    for lr in ("0.05", "0.03"):
        ours, theirs = two_cells / "g" / f"lr-{lr}", two_cells / "separate" / f"lr-{lr}"
        assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
        assert json.load(open(ours / "config.json"))["config"]["lr"] == float(lr)
        assert_same_run(ours, theirs, rel=1e-5)
    assert records(two_cells / "g" / "lr-0.05") != records(two_cells / "g" / "lr-0.03")
    assert sorted(os.listdir(two_cells / "g")) == ["lr-0.03", "lr-0.05"]


def test_finished_grid_is_refused_without_resume_and_skipped_with_it(two_cells, capsys):
    grid = [*BASE, "--save_dir", str(two_cells / "g"), "--fused_grid", "lr=0.05,0.03"]
    before = {lr: (two_cells / "g" / f"lr-{lr}" / "metrics.jsonl").read_bytes() for lr in ("0.05", "0.03")}
    capsys.readouterr()
    assert main(grid) == 2
    assert capsys.readouterr().err == f"error: {two_cells / 'g' / 'lr-0.05'} already holds checkpoints of a run; " \
                                      f"pass --resume to continue it, or choose another --exp_name / --save_dir\n"
    assert main([*grid, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"--fused_grid: 2 cells under {two_cells / 'g'}, 0 to train fused in this process" in out
    assert f"cell lr-0.03: finished earlier (2 rounds), skipped; run dir {two_cells / 'g' / 'lr-0.03'}" in out
    assert {lr: (two_cells / "g" / f"lr-{lr}" / "metrics.jsonl").read_bytes() for lr in ("0.05", "0.03")} == before


def test_a_nan_cell_gives_the_exit_code_and_the_other_finishes(tmp_path, one_thread, capsys):
    code = main([*BASE, "--pruning_times", "1", "--warmup", "0", "--save_dir", str(tmp_path / "g"),
                 "--fused_grid", "lr=1e6,0.05"])
    assert code == 3
    out = capsys.readouterr().out
    assert f"cell lr-1e6: exit code 3; run dir {tmp_path / 'g' / 'lr-1e6'}" in out
    assert f"cell lr-0.05: exit code 0; run dir {tmp_path / 'g' / 'lr-0.05'}" in out
    assert os.path.isfile(paths.round_checkpoint(str(tmp_path / "g" / "lr-0.05"), 0))
    assert not os.path.exists(paths.round_checkpoint(str(tmp_path / "g" / "lr-1e6"), 0))
    summary = [line for line in out.splitlines() if line.startswith("fused driver time: ")]
    assert len(summary) == 1 and re.fullmatch(
        r"fused driver time: [\d.]+ s training steps \([\d.]+ %\), [\d.]+ s cell <-> fused copies \([\d.]+ %\), "
        r"[\d.]+ s fused evaluation \([\d.]+ %\), [\d.]+ s the cells' own code between epochs \([\d.]+ %\)",
        summary[0])


def test_extending_a_grid_resumes_old_cells_and_fuses_new_ones_when_they_meet(tmp_path, one_thread, capsys):
    """seed 1 ran 1 round; `seed=1,2 --pruning_times 2 --resume` trains seed 2's round 0 alone, then both
    fused in round 1 (their models come from different stages: validation vs. training)."""
    grid = [*BASE[:BASE.index("--pruning_times")], *BASE[BASE.index("--epochs"):], "--save_dir", str(tmp_path)]
    assert main([*grid, "--pruning_times", "1", "--fused_grid", "seed=1"]) == 0
    assert main([*grid, "--pruning_times", "2", "--resume", "--fused_grid", "seed=1,2"]) == 0
    out = capsys.readouterr().out
    assert "[seed-1] resuming from" in out and "exit code 0; run dir" in out
    for seed in (1, 2):
        assert [r["round"] for r in read_jsonl(paths.metrics_file(str(tmp_path / f"seed-{seed}")))
                if r["type"] == "round"] == [0, 1]


@pytest.mark.slow
def test_fused_grid_equals_sweep_fused_executor(tmp_path):
    """The same grid through sweep.py --executor fused and through --fused_grid (both in a fresh process):
    the same cell run dirs, bit-identical metrics, masks and weights."""
    sweep = subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), "--root", str(tmp_path), "--name", "s",
                            "--executor", "fused", "--grid", "lr=0.05,0.03", "--grid", "weight_decay=0,5e-4", "--",
                            *BASE], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    ours = subprocess.run([sys.executable, os.path.join(ROOT, "main_imp_fillback.py"), *BASE, *GRID, "--resume",
                           "--save_dir", str(tmp_path / "f")], cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert sorted(os.listdir(tmp_path / "f")) == sorted(NAMES)
    for name in NAMES:
        assert sorted(os.listdir(tmp_path / "f" / name)) == sorted(os.listdir(tmp_path / "s" / name))
        assert_same_run(tmp_path / "f" / name, tmp_path / "s" / name, rel=0)
