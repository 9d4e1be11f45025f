"""Without a TTY (Slurm, nohup) every epoch prints one line, and every --print_freq steps one more, to the
console and log.txt (issue 16 §8); config.json holds the effective warm-up and milestones."""
import json
import re

from conftest import FAST, run_main
from utils import paths

EPOCH_LINE = re.compile(r"round (\d) epoch (\d)/2: loss \d+\.\d{4}  train \d+\.\d\d%  val \d+\.\d\d%  lr ([\d.e+-]+)  "
                        r"lambda 0  \d+ img/s  round ETA \d:\d\d:\d\d$")
STEP_LINE = re.compile(r"round (\d) epoch (\d)/2 step (\d)/3: running loss \d+\.\d{4}  \d+ img/s$")


def test_epoch_and_step_lines_reach_stdout_and_log_txt(tmp_path):
    directory = str(tmp_path / "run")
    # 300 training images in batches of 100: 3 steps an epoch, a step line after step 2
    result = run_main(*FAST, "--arch", "test_vit", "--struct", "none", "--rate", "0.5", "--val_size", "2700",
                      "--batch_size", "100", "--pruning_times", "1", "--epochs", "2", "--print_freq", "2",
                      "--save_dir", directory)  # stdout is a pipe here, not a TTY
    with open(paths.log_file(directory)) as f:
        logged = [line.rstrip("\n").split(" ", 2)[2] for line in f]  # drop the date and time
    for lines in (result.stdout.splitlines(), logged):
        epochs = [m.groups() for m in map(EPOCH_LINE.match, lines) if m]
        steps = [m.groups() for m in map(STEP_LINE.match, lines) if m]
        assert epochs == [("0", "1", "0.05"), ("0", "2", "0.005")], lines
        assert steps == [("0", "1", "2"), ("0", "2", "2")], lines
        assert lines.index(next(l for l in lines if STEP_LINE.match(l))) < \
            lines.index(next(l for l in lines if EPOCH_LINE.match(l)))
    with open(paths.config_file(directory)) as f:
        config = json.load(f)["config"]
    assert (config["warmup"], config["decreasing_lr"]) == (0, [1])  # effective values, not 20 and []
