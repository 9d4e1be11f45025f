"""torchrun: 2 processes (gloo, CPU) train one run as one process would -- sharded batches, averaged
gradients, identical masks (checksums of both ranks logged by rank 0), one writer, stops agreed at a step
boundary, resume after a kill. docs/ddp.md describes the design."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST, ROOT, read_jsonl, run_main
from data import load
from data.loader import TensorLoader, shard_bounds
from training.rank_agreement import AgreedStopRequest, RankMismatch, compare_ranks, masks_checksum
from utils import checkpoint, paths
from utils.lock import RunLock

TINY = [*FAST, "--arch", "test_vit", "--struct", "none", "--rate", "0.5", "--val_size", "2700"]
ONE_PROCESS_FILES = ["0checkpoint.pth.tar", "0model_best.pth.tar", "1checkpoint.pth.tar", "1model_best.pth.tar",
                     "config.json", "lineage.json", "log.txt", "metrics.jsonl", "provenance.json", "rewind.pth.tar"]
CHECKSUMS = re.compile(r"round (\d+) on 2 ranks: masks sha256 rank0=(\w+) rank1=(\w+); "
                       r"weights sha256 rank0=(\w+) rank1=(\w+)")
# 300 training images in batches of 16 (8 per rank): 18 steps an epoch, each a step boundary to stop at
STEPS = [*TINY, "--batch_size", "16", "--print_freq", "1", "--pruning_times", "2", "--epochs", "2",
         "--deterministic", "--checkpoint_interval", "0"]


def torchrun_command(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            os.path.join(ROOT, "main_imp_fillback.py"), *map(str, args)]


def environment():
    return dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def torchrun(*args, check=True, timeout=600):
    result = subprocess.run(torchrun_command(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=environment())
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def start_torchrun(args):
    """torchrun in its own process group (killable as a whole), stdout piped line by line."""
    return subprocess.Popen(torchrun_command(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=environment(), start_new_session=True)


def logged_checksums(directory):
    with open(paths.log_file(directory)) as f:
        return CHECKSUMS.findall(f.read())


def relative_difference(ours, theirs):
    return max(float((ours[k] - theirs[k]).norm() / theirs[k].norm().clamp_min(1e-12))
               for k in theirs if theirs[k].is_floating_point())


# ---- pure parts -------------------------------------------------------------------------------------
def test_shard_bounds_split_each_batch_like_tensor_split():
    assert shard_bounds(40, 16, 0, 2) == [(0, 8), (16, 24), (32, 36)]
    assert shard_bounds(40, 16, 1, 2) == [(8, 16), (24, 32), (36, 40)]
    # 3 ranks: a batch of 4 rows splits 2, 1, 1; the last batch of 1 row 1, 0, 0 (an empty part is left out)
    assert [shard_bounds(5, 4, rank, 3) for rank in range(3)] == [[(0, 2), (4, 5)], [(2, 3)], [(3, 4)]]


@pytest.mark.parametrize("train, batch_size", [(True, 64), (False, 1000)])
def test_the_shards_of_each_batch_are_the_one_process_batch(train, batch_size):
    """Same global order, crops and flips whatever the number of ranks: concatenated, the ranks' parts of
    each batch are bit-identical to the 1-process batch (and no image is left out or repeated)."""
    splits = load("synthetic", "data", 2700)
    source = splits.val if not train else splits.train

    def batches(rank, ranks):
        loader = TensorLoader(source, batch_size, splits.spec.mean, splits.spec.std, torch.device("cpu"), train,
                              drop_last=train, shard=(rank, ranks))
        loader.set_epoch_seed(12345)
        return list(loader)
    whole = batches(0, 1)
    parts = [batches(rank, 2) for rank in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole) > 1
    for index, (images, labels) in enumerate(whole):
        assert [len(p[index][1]) for p in parts] == [len(labels) // 2, len(labels) - len(labels) // 2]
        assert torch.equal(torch.cat([p[index][0] for p in parts]), images)
        assert torch.equal(torch.cat([p[index][1] for p in parts]), labels)


def test_compare_ranks_names_the_ranks_that_differ():
    assert compare_ranks("masks", ["ab", "ab", "ab"]) is None
    assert compare_ranks("round 2: masks", ["ab", "ab", "cd"]) == "round 2: masks differ between ranks: rank 0 ab, " \
                                                                 "rank 2 cd"
    assert issubclass(RankMismatch, Exception)


class FakeRanks:
    """Stands in for the process group: the agreed signal is the largest one any of `others` + ours got."""

    def __init__(self, others):
        self.others = others

    def agree_on_signal(self, local):
        return max([local or 0, *self.others]) or None


def test_a_stop_is_agreed_at_a_step_boundary_and_a_forwarded_repeat_counts_once():
    stop = AgreedStopRequest(FakeRanks([0]), log=lambda message: None)
    assert not stop.at_step_boundary()
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # torchrun forwarding the same SIGTERM: not a "stop now"
    assert not stop.requested  # the handler only records: ranks act on it together
    assert stop.at_step_boundary() and stop.signum == signal.SIGTERM
    other = AgreedStopRequest(FakeRanks([int(signal.SIGTERM)]), log=lambda message: None)
    assert other.at_step_boundary() and other.signum == signal.SIGTERM  # signalled elsewhere: stops too


def test_a_batch_not_divisible_by_the_ranks_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from utils.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    directory = str(tmp_path / "refused")
    assert main([*TINY, "--batch_size", "63", "--save_dir", directory]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --batch_size 63: not divisible by the 2 torchrun processes; --batch_size is the global "
                   "batch, each rank trains on batch_size / 2 images\n")
    assert not os.path.exists(directory)


# ---- two processes ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process run of 2 rounds x 1 epoch (test_vit, 300 training images, global batch 64)."""
    directory = str(tmp_path_factory.mktemp("ddp") / "run")
    return directory, torchrun(*TINY, "--pruning_times", "2", "--epochs", "1", "--save_dir", directory)


def test_two_ranks_train_identical_masks_and_only_rank_0_writes(two_ranks):
    directory, result = two_ranks
    assert sorted(os.listdir(directory)) == ONE_PROCESS_FILES  # nothing more: rank 1 wrote no file
    assert [(r["type"], r["round"]) for r in read_jsonl(paths.metrics_file(directory))] == \
        [("epoch", 0), ("round", 0), ("epoch", 1), ("round", 1)]  # one writer: no record twice
    logged = logged_checksums(directory)
    assert [int(line[0]) for line in logged] == [0, 1]
    for _, masks0, masks1, weights0, weights1 in logged:
        assert masks0 == masks1 and weights0 == weights1
    # the logged checksum is that of the masks round 1 trained with (--struct none: train = final masks)
    saved = checkpoint.load(paths.round_checkpoint(directory, 1))
    masks = {name: mask.to(saved["model"][name].dtype) for name, mask in saved["masks"].items()}
    assert logged[1][1] == masks_checksum([masks, masks]) != logged[0][1]
    assert 49.9 < saved["metrics"]["remaining_pct"] < 50.1
    assert result.stdout.count("round 1 on 2 ranks") == 1  # rank 1 prints nothing


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_same_global_batch(two_ranks, tmp_path):
    directory, _ = two_ranks
    single = str(tmp_path / "single")
    run_main(*TINY, "--pruning_times", "2", "--epochs", "1", "--save_dir", single)
    assert sorted(os.listdir(single)) == sorted(os.listdir(directory))
    for round_index in (0, 1):
        ours, theirs = (checkpoint.load(paths.round_checkpoint(d, round_index)) for d in (directory, single))
        for name in theirs["masks"]:
            assert torch.equal(ours["masks"][name], theirs["masks"][name]), name
        assert relative_difference(ours["model"], theirs["model"]) <= 1e-5
        assert abs(ours["metrics"]["train_loss"] - theirs["metrics"]["train_loss"]) <= 1e-5
        assert abs(ours["metrics"]["test_top1"] - theirs["metrics"]["test_top1"]) <= 0.2  # 2 of 1,000 images


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ddp_reference") / "run")
    torchrun(*STEPS, "--save_dir", directory)
    return directory


def assert_same_run(ours, theirs):
    for round_index in (0, 1):
        a, b = (checkpoint.load(paths.round_checkpoint(d, round_index)) for d in (ours, theirs))
        for name in b["model"]:
            assert torch.equal(a["model"][name], b["model"][name]), name
        for name in b["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name]), name
    keys = ("type", "round", "epoch", "train_loss", "train_top1", "val_top1", "test_top1")
    assert [{k: r.get(k) for k in keys} for r in read_jsonl(paths.metrics_file(ours))] == \
        [{k: r.get(k) for k in keys} for r in read_jsonl(paths.metrics_file(theirs))]


@pytest.mark.slow
def test_killed_torchrun_group_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    killed = str(tmp_path / "killed")
    process = start_torchrun([*STEPS, "--save_dir", killed])
    for line in process.stdout:  # SIGKILL every process (torchrun and both ranks) in round 1, mid-epoch
        if "round 1 epoch 2/2 step 7/18" in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    saved = checkpoint.load(paths.latest_checkpoint(killed))
    assert (saved["round"], saved["epoch"]) == (1, 1)  # --checkpoint_interval 0: saved after round 1's epoch 1
    resumed = torchrun(*STEPS, "--save_dir", killed, "--resume")
    assert "resuming from" in resumed.stdout
    assert_same_run(killed, uninterrupted)


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_the_same_step_then_resumes(uninterrupted, tmp_path):
    stopped = str(tmp_path / "stopped")
    process = start_torchrun([*STEPS, "--save_dir", stopped])
    for line in process.stdout:
        if "round 0 epoch 2/2 step 4/18" in line:
            sent = time.time()
            process.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both ranks
            break
    output = process.stdout.read()
    process.wait(timeout=120)
    assert time.time() - sent < 30, output  # torchrun kills its workers 30 s after forwarding a signal
    agreed = re.search(r"stop position \(round, epoch, step\) agree on all 2 ranks: \(0, 2, (\d+)\)", output)
    assert agreed, output
    # both ranks stopped themselves (none was killed); only rank 0, the writer, says it saved
    assert output.count("stopped by SIGTERM; saved") == 1, output
    assert output.count("[rank 1] stopped by SIGTERM; rank 0 saved the checkpoint") == 1, output
    saved = checkpoint.load(paths.latest_checkpoint(stopped))
    assert (saved["round"], saved["epoch"], saved["scheduler"]["batch"]) == (0, 1, int(agreed.group(1)))
    assert saved["epoch_sums"]["seen"] == 16 * int(agreed.group(1))  # both ranks' images
    torchrun(*STEPS, "--save_dir", stopped, "--resume")
    assert_same_run(stopped, uninterrupted)


@pytest.mark.slow
def test_a_locked_run_dir_stops_every_rank_with_one_line(tmp_path):
    directory = str(tmp_path / "locked")
    with RunLock(directory, command=["holder"]):
        result = torchrun(*TINY, "--pruning_times", "1", "--epochs", "1", "--save_dir", directory, check=False,
                          timeout=120)
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 2 and all("is in use by another run" in line for line in refusals), result.stderr
    assert not os.path.exists(directory)  # the holder made it and removed it, empty, on release


@pytest.mark.slow
def test_batchnorm_model_on_the_cpu_keeps_the_ranks_identical(tmp_path):
    """res20s on gloo: per-rank BatchNorm statistics (SyncBatchNorm needs CUDA), rank 0's broadcast after each
    epoch, so both ranks still start round 1 with the same weights and buffers."""
    directory = str(tmp_path / "bn")
    torchrun(*FAST, "--struct", "none", "--rate", "0.5", "--val_size", "2700", "--pruning_times", "2", "--epochs",
             "1", "--save_dir", directory)
    logged = logged_checksums(directory)
    assert len(logged) == 2 and all(line[3] == line[4] and line[1] == line[2] for line in logged)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_with_the_cuda_graph_match_one_gpu(tmp_path):
    """NCCL all-reduce inside the captured step, SyncBatchNorm, torch.compile (the defaults), RSST's BatchNorm
    recalibration: the 2-GPU run agrees across ranks and lands near the 1-GPU run (bf16: not bit-exact)."""
    args = ["--dataset", "synthetic", "--arch", "res20s", "--struct", "rsst", "--rate", "0.5", "--pruning_times",
            "2", "--epochs", "3", "--batch_size", "128", "--lr", "0.05", "--no_wandb", "--no_progress"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    torchrun(*args, "--save_dir", two)
    run_main(*args, "--save_dir", one)
    assert all(line[1] == line[2] and line[3] == line[4] for line in logged_checksums(two))
    ours, theirs = (json.load(open(paths.lineage_file(d)))["rounds"] for d in (two, one))
    for a, b in zip(ours, theirs):
        assert abs(a["remaining_pct"] - b["remaining_pct"]) < 0.1 and abs(a["val_top1"] - b["val_top1"]) < 8
