"""Kill a real run anywhere (SIGKILL), resume it, and demand the same result bit for bit.

Kill points are made deterministic by a test-side bootstrap (BOOT below): the child
process installs a trigger, then runs the real CLI (`utils.cli.main`), and the
trigger SIGKILLs the child itself at an exact place -- after the Nth training
step, half-way through writing a given checkpoint file, right after a file is
renamed into place, while scoring heads for the next round, or after the regroup
report. No product code carries a test hook. One kill is also made from outside
by polling, as a user's `kill -9` would be. The reference (an uninterrupted run)
is made once per module; the resumed runs must match it in every round
checkpoint (model, masks, best, metrics), every model_best, metrics.jsonl,
lineage.json and the set of files in the run dir.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import FAST, ROOT
from data import synthetic
from utils import checkpoint, paths

ARGS = [*FAST, "--arch", "test_vit", "--struct", "rsst", "--vit_structured", "--criteria", "saliency",
        "--rate", "0.5", "--pruning_times", "2", "--epochs", "2", "--deterministic", "--checkpoint_interval", "0",
        "--val_size", "2400"]  # a small training split: 9 steps an epoch
ROUNDS, EPOCHS = 2, 2
STEPS = (synthetic.TRAIN_SIZE - 2400) // 64  # training steps per epoch (drop_last)
# One thread everywhere: runs must agree bit for bit, and two busy cores make oversubscribed threads crawl.
ENV = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
KEYS = ("type", "round", "epoch", "epochs", "train_loss", "val_top1", "test_top1", "remaining_pct", "reg_lambda")

BOOT = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {root!r})
    trigger = json.loads(sys.argv[1])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if "steps" in trigger:  # once N training steps are done: when the (N+1)th training batch is drawn
        from data.loader import TensorLoader
        real_iter, count = TensorLoader.__iter__, [0]
        def batches(self):
            for batch in real_iter(self):
                if self.train:
                    if count[0] == trigger["steps"]:
                        die()
                    count[0] += 1
                yield batch
        TensorLoader.__iter__ = batches
    if "write" in trigger or "written" in trigger:  # around the atomic rename of one file
        real_replace, seen = os.replace, {{}}
        def replace(src, dst, *a, **k):
            name = os.path.basename(dst)
            seen[name] = seen.get(name, 0) + 1
            if name == trigger.get("write") and seen[name] == trigger.get("nth", 1):
                with open(src, "r+b") as f:  # what a kill mid-write leaves: half a temp file
                    f.truncate(os.path.getsize(src) // 2)
                die()
            real_replace(src, dst, *a, **k)
            if name == trigger.get("written") and seen[name] == trigger.get("nth", 1):
                die()
        os.replace = replace
    if "log" in trigger:  # after a report line is printed
        from utils.tracking import Tracker
        real_info = Tracker.info
        def info(self, message):
            real_info(self, message)
            if message.startswith(trigger["log"]):
                die()
        Tracker.info = info
    if "scoring" in trigger:  # mid-way through the calibration batches that score heads
        from training.rounds import RoundRunner
        real_batches = RoundRunner.calibration_batches
        def batches(self):
            for index, batch in enumerate(real_batches(self)):
                if index == trigger["scoring"]:
                    die()
                yield batch
        RoundRunner.calibration_batches = batches

    from utils.cli import main
    sys.exit(main(sys.argv[2:]))
""").format(root=ROOT)


def launch(directory, trigger=None, *extra):
    command = [sys.executable, "-c", BOOT, json.dumps(trigger or {}), *ARGS, "--save_dir", str(directory), *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)


def finish(process, expect=0):
    out, err = process.communicate(timeout=600)
    assert process.returncode == expect, f"exit {process.returncode}\n{out}\n{err}"
    return out, err


def resume(directory):
    return finish(launch(directory, None, "--resume"))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def artifacts(directory):
    """The files a run leaves; log.txt differs by design, leftover temp files are checked separately."""
    return sorted(n for n in os.listdir(directory) if n != "log.txt" and not n.startswith(".tmp-"))


def assert_same_run(ours, reference):
    assert artifacts(ours) == artifacts(reference)
    for k in range(ROUNDS):
        for path_of in (paths.round_checkpoint, paths.round_best):
            mine, theirs = checkpoint.load(path_of(ours, k)), checkpoint.load(path_of(reference, k))
            for part in ("model", "masks"):
                assert mine[part].keys() == theirs[part].keys()
                for name, tensor in theirs[part].items():
                    assert torch.equal(mine[part][name], tensor), f"{path_of(ours, k)}: {part} {name}"
            assert mine["best"] == theirs["best"]
            assert {**mine["metrics"], "checkpoint": None} == {**theirs["metrics"], "checkpoint": None}
    comparable = lambda d: [{k: r.get(k) for k in KEYS} for r in read_jsonl(paths.metrics_file(d))]
    assert comparable(ours) == comparable(reference)
    lineage = lambda d: [{k: r[k] for k in ("round", "test_top1", "val_top1", "remaining_pct")} | {
        "parent": os.path.basename(r["parent"])} for r in json.load(open(paths.lineage_file(d)))["rounds"]]
    assert lineage(ours) == lineage(reference)


def damage(directory):
    """Truncate latest.pth.tar and plant a complete, *more advanced*, wrong checkpoint under a temp name."""
    latest = paths.latest_checkpoint(directory)
    tempting = checkpoint.load(latest)
    tempting["epoch"] = EPOCHS
    tempting["model"] = {k: torch.zeros_like(v) for k, v in tempting["model"].items()}
    checkpoint.save(os.path.join(directory, ".tmp-planted.part"), tempting)
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference and a run SIGKILLed mid-way through round 1's second epoch, made side by side;
    then two copies of the killed run resumed side by side, one with a damaged run dir."""
    base = tmp_path_factory.mktemp("crash")
    reference, killed = str(base / "reference"), str(base / "killed")
    started = [launch(reference), launch(killed, {"steps": (EPOCHS + 1) * STEPS + STEPS // 2})]
    finish(started[0])
    finish(started[1], expect=-signal.SIGKILL)
    latest = checkpoint.load(paths.latest_checkpoint(killed))
    assert (latest["round"], latest["epoch"]) == (1, 1)  # the kill landed where the test says it does
    plain, damaged = str(base / "plain"), str(base / "damaged")
    shutil.copytree(killed, plain)
    shutil.copytree(killed, damaged)
    damage(damaged)
    resumed = [launch(d, None, "--resume") for d in (plain, damaged)]
    outputs = [finish(p) for p in resumed]
    return {"reference": reference, "plain": plain, "damaged": damaged, "damaged_err": outputs[1][1]}


@pytest.fixture(scope="module")
def reference(runs):
    return runs["reference"]


def test_kill_mid_epoch_resumes_bit_identically(runs):
    assert_same_run(runs["plain"], runs["reference"])


def test_truncated_latest_and_leftover_temp_files_are_never_picked(runs):
    err = runs["damaged_err"]
    assert "skipping unusable checkpoint" in err and "latest.pth.tar" in err
    assert_same_run(runs["damaged"], runs["reference"])  # round 1 was rerun from 0checkpoint.pth.tar


KILL_POINTS = [
    pytest.param({"write": "rewind.pth.tar"}, id="writing_rewind_weights"),  # before any training
    pytest.param({"steps": 3}, id="first_steps"),  # no checkpoint yet
    pytest.param({"steps": STEPS + STEPS // 2}, id="mid_epoch_round0"),
    pytest.param({"write": "latest.pth.tar", "nth": 1}, id="writing_first_latest"),
    pytest.param({"write": "0checkpoint.pth.tar"}, id="writing_round0_checkpoint"),
    pytest.param({"written": "0checkpoint.pth.tar"}, id="after_round0_checkpoint"),
    pytest.param({"write": "lineage.json"}, id="writing_round0_lineage"),
    pytest.param({"scoring": 1}, id="scoring_heads"),
    pytest.param({"log": "[ViT Head-level"}, id="after_regroup_report"),
    pytest.param({"write": "latest.pth.tar", "nth": 2}, id="writing_round1_latest"),
    pytest.param({"write": "1checkpoint.pth.tar"}, id="writing_last_checkpoint"),
    pytest.param({"write": "1model_best.pth.tar"}, id="writing_last_model_best"),
    pytest.param({"written": "1checkpoint.pth.tar"}, id="after_last_checkpoint"),  # before lineage, cleanup
]


@pytest.mark.slow
@pytest.mark.parametrize("trigger", KILL_POINTS)
def test_kill_anywhere_resumes_bit_identically(reference, tmp_path, trigger):
    directory = tmp_path / "run"
    finish(launch(directory, trigger), expect=-signal.SIGKILL)
    resume(str(directory))
    assert_same_run(str(directory), reference)


@pytest.mark.slow
def test_external_kill_between_rounds(reference, tmp_path):
    """A user's kill -9 as soon as round 0's record is in metrics.jsonl: pruning for round 1 is under way."""
    directory = tmp_path / "run"
    process, metrics, deadline = launch(directory), paths.metrics_file(str(directory)), time.time() + 600
    while process.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and '"type": "round"' in open(metrics).read():
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    finish(process, expect=-signal.SIGKILL)
    assert not os.path.exists(paths.round_checkpoint(str(directory), 1))  # killed before round 1 ended
    resume(str(directory))
    assert_same_run(str(directory), reference)
