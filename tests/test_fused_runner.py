"""Fused sweeps (training/fused/runner.py, cells.py, run.py; sweeps/fused.py): N runs trained as one model,
each leaving the run dir a separate run leaves, with the same numbers.

test_vit runs (the streams route under auto) are used for the numbers: in fp32 they follow their separate runs to
about 1e-7 relative (res20s's grouped convolutions drift by fp32 rounding, docs/fused.md)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, read_jsonl
from training.fused import cells as fusion
from training.fused.runner import run_cells
from utils import checkpoint, paths
from utils.cli import main as runner_main, parse_config

pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]
BASE = ["--dataset", "synthetic", "--arch", "test_vit", "--no_wandb", "--no_progress", "--batch_size", "64",
        "--struct", "rsst", "--vit_structured", "--criteria", "saliency", "--rate", "0.5", "--pruning_times", "2",
        "--epochs", "2", "--val_size", "2400", "--deterministic", "--checkpoint_interval", "0"]  # 9 steps an epoch
CELLS = [["--seed", "1", "--lr", "0.05"], ["--seed", "2", "--lr", "0.03", "--weight_decay", "5e-4"]]
STEPS, EPOCHS, ROUNDS = 9, 2, 2
ENV = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def cell_argv(base, cell, directory):
    return [*base, *cell, "--save_dir", str(directory)]


def artifacts(directory):
    return sorted(os.listdir(directory))


def epoch_losses(directory):
    return [r["train_loss"] for r in read_jsonl(paths.metrics_file(directory)) if r["type"] == "epoch"]


def assert_same_rounds(ours, theirs, rel=0.0):
    """Round checkpoints: equal masks; weights, losses within `rel` (0: bit for bit); equal accuracies."""
    for k in range(ROUNDS):
        mine, other = checkpoint.load(paths.round_checkpoint(ours, k)), checkpoint.load(paths.round_checkpoint(theirs, k))
        assert mine["masks"].keys() == other["masks"].keys()
        for name, mask in other["masks"].items():
            assert torch.equal(mine["masks"][name], mask), f"round {k} mask {name}"
        for name, tensor in other["model"].items():
            if rel == 0:
                assert torch.equal(mine["model"][name], tensor), f"round {k} {name}"
            else:
                assert torch.allclose(mine["model"][name].double(), tensor.double(), rtol=0, atol=1e-4), name
    ours_loss, theirs_loss = epoch_losses(ours), epoch_losses(theirs)
    assert len(ours_loss) == len(theirs_loss) == ROUNDS * EPOCHS
    for a, b in zip(ours_loss, theirs_loss):
        assert abs(a - b) <= rel * abs(b), (ours_loss, theirs_loss)
    accuracies = lambda d: [(r["type"], r.get("val_top1"), r.get("test_top1"), r["remaining_pct"])  # noqa: E731
                            for r in read_jsonl(paths.metrics_file(d))]
    assert accuracies(ours) == accuracies(theirs)


@pytest.fixture(scope="module")
def fused_and_separate(tmp_path_factory, one_thread):
    """Two cells (other seed, lr, weight decay) trained fused in this process, and each run on its own."""
    base = tmp_path_factory.mktemp("fused")
    fused = [base / "fused" / f"cell{i}" for i in range(2)]
    separate = [base / "separate" / f"cell{i}" for i in range(2)]
    codes = run_cells([cell_argv(BASE, c, d) for c, d in zip(CELLS, fused)], ["cell0", "cell1"])
    assert codes == [0, 0]
    for cell, directory in zip(CELLS, separate):
        assert runner_main(cell_argv(BASE, cell, directory)) == 0
    return fused, separate


# ---- grouping (pure) ----------------------------------------------------------------------------------
def test_grouping_splits_incompatible_cells_and_caps_the_group_size():
    flags = ["--dataset", "synthetic", "--no_wandb"]
    configs = [parse_config([*flags, *extra]) for extra in (
        ["--seed", "1"], ["--batch_size", "64"], ["--seed", "2", "--lr", "0.1", "--rate", "0.3"],
        ["--seed", "3", "--criteria", "remain", "--weight_decay", "5e-4"], ["--arch", "res56s"],
        ["--seed", "4", "--val_size", "300"])]  # the default val_size of synthetic, given explicitly
    assert fusion.group_cells(configs, 8) == [[0, 2, 3, 5], [1], [4]]
    assert fusion.group_cells(configs, 3) == [[0, 2], [3, 5], [1], [4]]
    assert fusion.differences(configs[0], configs[1]) == ["--batch_size 128 vs 64"]
    with pytest.raises(ValueError, match="at least 1"):
        fusion.group_cells(configs, 0)
    assert fusion.unfusable(configs[0]) is None
    assert "--struct lowrank" in fusion.unfusable(parse_config([*flags, "--struct", "lowrank"]))
    assert fusion.unfusable(parse_config([*flags, "--nan_policy", "skip_batch"])) is None  # skips per cell


# ---- equivalence with separate runs ----------------------------------------------------------------------
def test_fused_cells_match_their_separate_runs(fused_and_separate):
    """Per-epoch losses within 1e-5 relative, identical accuracies and sparsity, identical masks after 2 rounds
    (each cell pruned and regrouped from its own weights), weights within 1e-4."""
    for ours, theirs in zip(*fused_and_separate):
        assert_same_rounds(str(ours), str(theirs), rel=1e-5)
    first = epoch_losses(str(fused_and_separate[0][0]))
    assert first != epoch_losses(str(fused_and_separate[0][1]))  # the cells trained differently


def test_streams_route_cells_match_their_separate_runs(fused_and_separate, tmp_path, one_thread, capsys):
    """--fused_route streams (one functional_call per cell; sequential on the CPU) trains each cell as its
    separate run does: the same masks, accuracies and losses (1e-5), weights within 1e-4. Each cell's log and
    printed lines say which route ran."""
    streams = [tmp_path / f"cell{i}" for i in range(2)]
    base = [*BASE, "--fused_route", "streams", "--print_freq", "4"]
    assert run_cells([cell_argv(base, c, d) for c, d in zip(CELLS, streams)], ["cell0", "cell1"]) == [0, 0]
    out = capsys.readouterr().out
    assert "[cell0] fused with cell1 on the streams route (--fused_route streams)\n" in out
    assert "[cell1] round 1 epoch 2/2 step 8/9: running loss " in out  # the driver's lines carry the cell's label
    assert "fused with cell0 on the streams route" in (streams[1] / "log.txt").read_text()
    for ours, theirs in zip(streams, fused_and_separate[1]):
        assert_same_rounds(str(ours), str(theirs), rel=1e-5)
    auto, routed = parse_config(BASE), parse_config(base)
    assert fusion.differences(auto, routed) == ["--fused_route auto vs streams"]  # never one group


def test_each_cell_has_the_files_of_a_separate_run(fused_and_separate):
    for ours, theirs in zip(*fused_and_separate):
        assert artifacts(ours) == artifacts(theirs)
        assert "1checkpoint.pth.tar" in artifacts(ours) and "lineage.json" in artifacts(ours)
        lineage = json.load(open(paths.lineage_file(str(ours))))
        assert [r["round"] for r in lineage["rounds"]] == [0, 1]
        assert lineage["run_dir"] == os.path.abspath(ours)
        assert json.load(open(ours / "config.json"))["config"]["seed"] == int(CELLS[int(ours.name[-1])][1])


def test_a_nan_cell_drops_out_and_the_other_finishes(tmp_path, one_thread, capsys):
    base = [*BASE[:BASE.index("--epochs")], "--epochs", "1", "--warmup", "0"]
    bad, good = tmp_path / "bad", tmp_path / "good"
    codes = run_cells([cell_argv(base, ["--lr", "1e6"], bad), cell_argv(base, ["--lr", "0.05"], good)],
                      ["bad", "good"])
    assert codes == [3, 0]
    err = capsys.readouterr().err
    assert "[bad] error: round 0 epoch 1 step" in err and "the loss is not finite" in err
    assert not os.path.exists(paths.round_checkpoint(str(bad), 0))
    rounds = [r for r in read_jsonl(paths.metrics_file(str(good))) if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1] and all(0 < r["train_loss"] < 10 for r in rounds)


def test_skip_batch_skips_per_cell_like_a_separate_run(tmp_path, one_thread, capsys):
    """--nan_policy skip_batch fuses: the diverging cell skips its non-finite batches (weights and momentum
    kept) and stops as its separate run stops, with the same line; the other cell's losses are its separate
    run's (1e-5)."""
    base = [*BASE[:BASE.index("--epochs")], "--epochs", "1", "--warmup", "0", "--nan_policy", "skip_batch"]
    cells = [["--lr", "1e6"], ["--lr", "0.05"]]
    fused = [tmp_path / "fused" / name for name in ("bad", "good")]
    assert run_cells([cell_argv(base, c, d) for c, d in zip(cells, fused)], ["bad", "good"]) == [3, 0]
    fused_err = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines() if line.startswith("[bad] error")]
    separate = [tmp_path / "separate" / name for name in ("bad", "good")]
    assert [runner_main(cell_argv(base, c, d)) for c, d in zip(cells, separate)] == [3, 0]
    separate_err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(fused_err) == 1 and " after 40 skipped batches; stopped without saving" in fused_err[0]
    assert fused_err == [e.replace(str(separate[0]), str(fused[0])) for e in separate_err]
    ours, theirs = epoch_losses(str(fused[1])), epoch_losses(str(separate[1]))
    assert len(ours) == 2 and ours == pytest.approx(theirs, rel=1e-5)


# ---- kill and resume --------------------------------------------------------------------------------
BOOT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    kill_after = int(sys.argv[1])  # fused steps; each draws one training batch per cell
    if kill_after >= 0:
        from data.loader import TensorLoader
        real_iter, count = TensorLoader.__iter__, [0]
        def batches(self):
            for batch in real_iter(self):
                if self.train:
                    if count[0] == kill_after * 2:
                        os.kill(os.getpid(), signal.SIGKILL)
                    count[0] += 1
                yield batch
        TensorLoader.__iter__ = batches
    from training.fused.run import main
    sys.exit(main(sys.argv[2:]))
""").format(root=ROOT)


def run_fused_process(cells_file, kill_after=-1, expect=0):
    process = subprocess.run([sys.executable, "-c", BOOT, str(kill_after), "--cells", str(cells_file)], cwd=ROOT,
                             capture_output=True, text=True, env=ENV, timeout=600)
    assert process.returncode == expect, process.stdout + process.stderr
    return process


@pytest.mark.slow
def test_killed_fused_group_resumes_to_the_uninterrupted_result_and_a_cell_resumes_alone(tmp_path):
    """SIGKILL in round 1's second epoch (after round 1 epoch 1's checkpoints), then the same command again
    (its cells carry --resume): every checkpoint equals the uninterrupted fused group's bit for bit. A copy
    of one killed cell, resumed alone by main_imp_fillback.py --resume, finishes both rounds too."""
    def write_cells(folder):
        directories = [folder / f"cell{i}" for i in range(2)]
        cells_file = tmp_path / f"{folder.name}.json"
        cells_file.write_text(json.dumps({"cells": [cell_argv(BASE, [*c, "--resume"], d)
                                                    for c, d in zip(CELLS, directories)]}))
        return cells_file, directories
    reference_file, reference = write_cells(tmp_path / "reference")
    killed_file, killed = write_cells(tmp_path / "killed")
    run_fused_process(reference_file)
    run_fused_process(killed_file, kill_after=(EPOCHS + 1) * STEPS + STEPS // 2, expect=-signal.SIGKILL)
    for directory in killed:
        latest = checkpoint.load(paths.latest_checkpoint(str(directory)))
        assert (latest["round"], latest["epoch"]) == (1, 1)  # the kill landed where the test says
    alone = tmp_path / "alone"
    shutil.copytree(killed[1], alone)
    resumed = run_fused_process(killed_file)
    assert "resuming from" in resumed.stdout and "exit code 0" in resumed.stdout
    for ours, theirs in zip(killed, reference):
        assert artifacts(ours) == artifacts(theirs)
        assert_same_rounds(str(ours), str(theirs))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "main_imp_fillback.py"),
                          *cell_argv(BASE, [*CELLS[1], "--resume"], alone)], cwd=ROOT, capture_output=True,
                         text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming from" in out.stdout
    assert_same_rounds(str(alone), str(reference[1]), rel=1e-5)


# ---- the entry point and the sweep executor ------------------------------------------------------------
def test_fused_entry_refuses_bad_cells_in_one_line(tmp_path, capsys):
    from training.fused.run import main
    bad = tmp_path / "cells.json"
    bad.write_text(json.dumps({"cells": [[*cell_argv(BASE, [], tmp_path / "a"), "--struct", "lowrank"]]}))
    assert main(["--cells", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: cell 0: --criteria saiency".replace("saiency", "saliency"))
    lowrank = ["--dataset", "synthetic", "--arch", "test_vit", "--no_wandb", "--struct", "lowrank", "--save_dir",
               str(tmp_path / "b")]
    bad.write_text(json.dumps({"cells": [cell_argv(BASE, [], tmp_path / "a"), lowrank]}))
    assert main(["--cells", str(bad)]) == 2
    assert capsys.readouterr().err == f"error: cell 1 ({tmp_path / 'b'}): --struct lowrank changes the model's " \
        "layers or forward, so its runs cannot be fused\n"
    bad.write_text(json.dumps({"cells": [[*cell_argv(BASE, [], tmp_path / "a"), "--fused_route", "grouped",
                                          "--arch", "test_vit2"]]}))
    assert main(["--cells", str(bad)]) == 2  # register tokens: refused before any cell starts
    assert capsys.readouterr().err == f"error: cell 0 ({tmp_path / 'a'}): --fused_route grouped with --arch " \
        "test_vit2: grouped ViT fusion takes timm's plain ViT; this one differs in: no class token; register tokens; " \
        "use --fused_route auto or streams\n"
    bad.write_text(json.dumps({"cells": [cell_argv(BASE, [], tmp_path / "a")] * 2}))
    assert main(["--cells", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: cell 1: the same run dir as cell 0")
    assert main(["--cells", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --cells {tmp_path / 'missing.json'}: no such file (expected a "
                                              'fused cells file ({"cells": [[flags...], ...]})')
    bad.write_text('{"cells": [["--seed", "1"]')
    assert main(["--cells", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --cells {bad}: unreadable fused cells file (") and "(JSONDecodeError: " in err
    bad.write_text('[["--seed", "1"]]')
    assert main(["--cells", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --cells {bad}: not a fused cells file")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fused_executor_plans_groups_and_runs_unfusable_cells_alone(tmp_path):
    from sweeps import plan
    from sweeps.cli import build_parser
    from sweeps.fused import FusedPool, group_name
    grid = {"seed": ["1", "2", "3"], "struct": ["rsst", "lowrank"]}
    sweep = plan.build(grid, ["--dataset", "synthetic", "--no_wandb"], str(tmp_path), "g")
    pool = FusedPool(build_parser().parse_args(["--executor", "fused", "--fuse", "2"]))
    groups = [[cell.name for cell in group] for group in pool.plan_groups(sweep.cells)]
    assert groups == [["seed-1_struct-rsst"], ["seed-2_struct-rsst", "seed-3_struct-rsst"],
                      ["seed-1_struct-lowrank"], ["seed-2_struct-lowrank"], ["seed-3_struct-lowrank"]]
    assert group_name(pool.plan_groups(sweep.cells)[1]) == "fused-seed-2_struct-rsst-and-1-more"
    assert not os.path.exists(tmp_path / "g")


@pytest.mark.slow
def test_sweep_fused_executor_runs_compatible_cells_together(tmp_path):
    """A 2 seeds x 2 batch sizes grid: two fused groups (one per batch size), each cell in its own run dir;
    the same sweep again skips them all. --fuse 0 is refused."""
    runner = [*BASE[:BASE.index("--batch_size")], *BASE[BASE.index("--batch_size") + 2:BASE.index("--pruning_times")],
              "--pruning_times", "1", "--epochs", "1", "--val_size", "2800"]
    command = [sys.executable, os.path.join(ROOT, "sweep.py"), "--root", str(tmp_path), "--name", "f",
               "--executor", "fused", "--grid", "seed=1,2", "--grid", "batch_size=32,64", "--", *runner]
    refused = subprocess.run(command[:6] + ["--fuse", "0"] + command[6:], capture_output=True, text=True, env=ENV)
    assert refused.returncode == 2 and refused.stderr == "error: --fuse 0: must be at least 1\n"
    first = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    starts = [line for line in first.stdout.splitlines() if line.startswith("start ")]
    assert [line.split(" (")[0] for line in starts] == ["start fused-seed-1_batch_size-32-and-1-more",
                                                        "start fused-seed-1_batch_size-64-and-1-more"]
    assert "seed-1_batch_size-32, seed-2_batch_size-32" in starts[0]
    for name in ("seed-1_batch_size-32", "seed-2_batch_size-32", "seed-1_batch_size-64", "seed-2_batch_size-64"):
        assert (tmp_path / "f" / name / "0checkpoint.pth.tar").is_file()
        assert "fused group fused-seed-1_batch_size-" in (tmp_path / "f" / "logs" / f"{name}.log").read_text()
    rows = [line.split() for line in first.stdout.splitlines() if line.startswith("seed-")]
    assert [r[1:4] for r in rows] == [["new", "0", "1/1"]] * 4
    log = (tmp_path / "f" / "logs" / "fused-seed-1_batch_size-32-and-1-more.log").read_text()
    assert "[seed-2_batch_size-32] round 0 epoch 1/1" in log
    again = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0 and "start " not in again.stdout and "4 finished" in again.stdout
