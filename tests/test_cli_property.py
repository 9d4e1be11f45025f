"""Property: the CLI exits 2 with one line naming a bad flag exactly when some value is bad, and writes nothing.

Validity is computed here, from the spec, independently of utils/cli.py: each
flag has a list of valid and invalid spellings, and the rules that tie flags
together (milestones, warm-up and rewind epoch inside the round, no milestone
inside the warm-up, mode-specific flags refused where the mode does not read
them) are re-stated below.
"""
import contextlib
import io
import math
import os
import re
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from utils.cli import main

CUDA = torch.cuda.is_available()
# flag: (valid spellings, invalid spellings); values that argparse or validate() must refuse on their own
FLAGS = {
    "rate": (["0.1", "0.5", "0.99"], ["0", "1", "-0.2", "1.5", "abc", "nan"]),
    "pruning_times": (["1", "3", "20"], ["0", "-2", "2.5", "x"]),
    "batch_size": (["1", "64"], ["0", "-8", "6.4"]),
    "lr": (["0.01", "1"], ["0", "-0.1", "nan", "fast"]),
    "momentum": (["0", "0.9"], ["1", "-0.1", "1.5"]),
    "weight_decay": (["0", "1e-4"], ["-1e-4", "nan"]),
    "arch": (["res20s", "res56s", "res18", "vit_tiny", "vit_small", "test_vit"], ["resnet9000", "vit_huge_x"]),
    "dataset": (["synthetic", "cifar10", "cifar100"], ["imagenet", "CIFAR10"]),
    "struct": (["none", "refill", "regroup", "rsst", "token"], ["magic", "RSST"]),
    "criteria": (["remain", "magnitude", "l1", "l2", "saliency"], ["entropy", ""]),
    "RST_schedule": (["x", "x^2", "exp", "exp_custom_exponents"], ["cubic"]),
    "reg_granularity_prune": (["0", "1.0", "2.5"], ["-1", "nan"]),
    "exponents": (["1", "4"], ["0", "-1"]),
    "fillback_rate": (["0", "0.1", "1"], ["-0.1", "1.01"]),
    "val_size": (["0", "1", "500"], ["-1", "-5"]),  # 0: train on everything
    "criteria_batches": (["1", "4"], ["0"]),
    "block_size": (["1", "8"], ["0"]),
    "block_density": (["0.5", "1"], ["0", "1.5"]),
    "k_anchors": (["0", "10"], ["-1"]),
    "alpha": (["0", "0.5", "1"], ["-0.5", "2"]),
    "token_start_block": (["0", "3"], ["-1"]),
    "token_keep": (["3,2", "10"], ["0,2", "-1", "a,b"]),
    "checkpoint_interval": (["0", "30", "0.5"], ["-1", "nan"]),
    "workers": (["0", "2"], ["-1"]),
    "print_freq": (["1", "50"], ["0"]),
    "device": (["auto", "cpu"] + (["cuda"] if CUDA else []), ["tpu", "gpu", "cuda:x"] + ([] if CUDA else ["cuda"])),
    "wandb_mode": (["offline", "online", "disabled"], ["loud"]),
    "amp": (["auto", "none", "bf16"], ["fp8"]),
    "nan_policy": (["stop", "skip_batch"], ["ignore"]),
    "channels_last": (["auto", "on", "off"], ["yes"]),
    "compile": (["auto", "on", "off"], ["maybe"]),
    "prune_type": (["lt", "pt", "rewind_lt"], ["foo"]),
    "vit_prune_target": (["head", "mlp", "both"], ["all"]),
    "seed": (["0", "7", str(2 ** 32 - 1)], ["1.5", "x", "-3", str(2 ** 32), "18446744073709551616"]),
    "exp_name": (["a", "run_1"], ["../x", "a/b", "a\nb"]),
    "wandb_project": (["RSST", "my-project"], ["", "a/b", "p\nq"]),
}
SWITCHES = ["--vit_structured", "--prune_classifier", "--deterministic", "--no_progress", "--no_wandb", "--resume",
            "--no_cuda_graph"]
DEFAULT_EPOCHS, DEFAULT_REWIND_EPOCH = 120, 24


def as_int(text):
    try:
        return int(text)
    except ValueError:
        return None


def milestones_of(text):
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        return None


def invalid_flags(values, switches=()):
    """The flags whose values the spec rejects, given everything else on the command line."""
    bad = {flag for flag, value in values.items() if flag in FLAGS and value in FLAGS[flag][1]}
    epochs = as_int(values.get("epochs", str(DEFAULT_EPOCHS)))
    if epochs is None or epochs < 1:
        bad.add("epochs")
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    if "warmup" in values:
        warmup = as_int(values["warmup"])
        if warmup is None or not 0 <= warmup < epochs:
            bad.add("warmup")
    if "decreasing_lr" in values:
        ms = milestones_of(values["decreasing_lr"])
        if ms is None or any(not 0 < m < epochs for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
            bad.add("decreasing_lr")
        elif ms and "warmup" not in bad and "warmup" in values and ms[0] <= int(values["warmup"]):
            bad.add("decreasing_lr")  # the round would never train at the full --lr
    rewind = as_int(values.get("rewind_epoch", str(DEFAULT_REWIND_EPOCH)))  # the default counts too
    if rewind is None or (values.get("prune_type") == "rewind_lt" and not 0 <= rewind < epochs):
        bad.add("rewind_epoch")
    return bad | unread_flags(values, switches)


# what each mode-specific flag is read by, restated from the README's table "Flags a mode does not read"
DEFAULTS = {"criteria": "l1", "criteria_batches": 4, "fillback_rate": 0.0, "vit_prune_target": "both",
            "RST_schedule": "exp_custom_exponents", "reg_granularity_prune": 1.0, "exponents": 4, "block_size": 8,
            "block_density": 0.5, "k_anchors": 10, "alpha": 0.5, "token_start_block": 1,
            "rewind_epoch": DEFAULT_REWIND_EPOCH}


def differs(flag, text):
    if flag not in DEFAULTS:
        return True  # token_keep: no default value
    default = DEFAULTS[flag]
    try:
        return type(default)(text) != default
    except ValueError:
        return True


def unread_flags(values, switches):
    """Flags given with a non-default value that the chosen struct / schedule / prune type never reads."""
    struct, criteria = values.get("struct", "rsst"), values.get("criteria", "l1")
    channels, rsst = struct in ("refill", "rsst"), struct == "rsst"
    reads = {
        "criteria": channels, "fillback_rate": channels,
        "criteria_batches": channels and criteria in ("l1", "l2", "saliency"),
        "vit_prune_target": "--vit_structured" in switches,
        "RST_schedule": rsst, "reg_granularity_prune": rsst,
        "exponents": rsst and values.get("RST_schedule", "exp_custom_exponents") == "exp_custom_exponents",
        "block_size": struct == "regroup", "block_density": struct == "regroup",
        "token_keep": struct == "token", "k_anchors": struct == "token", "alpha": struct == "token",
        "token_start_block": struct == "token", "rewind_epoch": values.get("prune_type") == "rewind_lt",
    }
    unread = {flag for flag, read in reads.items() if flag in values and not read and differs(flag, values[flag])}
    if "--vit_structured" in switches and not channels:
        unread.add("vit_structured")
    if "--prune_classifier" in switches and struct == "token":
        unread.add("prune_classifier")
    return unread


def value_of(flag):
    if flag == "epochs":
        return st.sampled_from(["1", "2", "5", "10", "0", "-1", "2.5"])
    if flag in ("warmup", "rewind_epoch"):
        return st.sampled_from([str(n) for n in range(-1, 12)] + ["1.5"])
    if flag == "decreasing_lr":
        lists = st.lists(st.integers(-1, 12), min_size=1, max_size=3).map(lambda ms: ",".join(map(str, ms)))
        return st.one_of(lists, st.just("a,b"))
    valid, invalid = FLAGS[flag]
    return st.sampled_from(valid + invalid)


@st.composite
def command_lines(draw):
    names = draw(st.lists(st.sampled_from(sorted(FLAGS) + ["epochs", "warmup", "decreasing_lr", "rewind_epoch"]),
                          unique=True, max_size=8))
    # bias toward the cross-flag rules, which single-flag tests miss
    if draw(st.booleans()):
        names += [n for n in ("epochs", "warmup", "decreasing_lr", "prune_type", "rewind_epoch") if n not in names]
    values = {name: draw(value_of(name)) for name in names}
    if values.get("prune_type") == "foo" and draw(st.booleans()):
        values["prune_type"] = "rewind_lt"
    switches = draw(st.lists(st.sampled_from(SWITCHES), unique=True, max_size=3))
    argv = [f"--{name}={value}" for name, value in values.items()] + switches
    return draw(st.permutations(argv)), values


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_lines())
def test_exit_2_exactly_when_a_value_is_bad(case):
    argv, values = case
    bad, started, stderr = invalid_flags(values, [a for a in argv if a in SWITCHES]), [], io.StringIO()
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as cwd, contextlib.redirect_stderr(stderr):
        os.chdir(cwd)
        try:
            code = main(argv, run=started.append)
        finally:
            os.chdir(previous)
        assert os.listdir(cwd) == []
    err = stderr.getvalue().strip()
    event("rejected" if bad else "accepted")
    if bad:
        assert code == 2 and not started, (argv, bad)
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        named = re.search(r"--(\w+)", err)
        assert named and named.group(1) in bad, (err, bad)
    else:
        assert code == 0 and err == "", (argv, err)
        (config,) = started
        for flag in ("rate", "lr", "seed", "epochs", "arch", "dataset", "struct", "criteria", "device"):
            if flag in values:
                given_value = type(getattr(config, flag))(values[flag])
                assert getattr(config, flag) == given_value or math.isnan(given_value), (flag, values)


@pytest.mark.parametrize("flag", ["--lr", "--weight_decay"])
def test_infinite_optimiser_values_are_rejected(flag, capsys):
    assert main([f"{flag}=inf"], run=lambda config: None) == 2
    assert flag in capsys.readouterr().err
