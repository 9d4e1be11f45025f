"""Refill channel regrouping, RSST schedules and penalty, and each mode end to end."""
import json
import math

import pytest
import torch

from conftest import FAST, run_main
from pruners.channels import channels_to_keep, regroup_to_channels, top_k_mask
from pruners.rsst import schedule_value
from utils import checkpoint, paths


def test_channels_to_keep_matches_density_plus_refill():
    # the reference (default): int(n + (C - n) x fillback_rate) + 1; more cases in test_fidelity.py
    assert channels_to_keep(surviving=50, fan_in=10, out_channels=8) == 6
    assert channels_to_keep(surviving=2, fan_in=10, out_channels=8) == 1
    assert channels_to_keep(surviving=50, fan_in=10, out_channels=8, fillback_rate=0.5) == 7  # int(5 + 1.5) + 1
    assert channels_to_keep(surviving=80, fan_in=10, out_channels=8, fillback_rate=1.0) == 8
    # --refill_count nearest: round(n) + round((C - round(n)) x fillback_rate)
    assert channels_to_keep(surviving=50, fan_in=10, out_channels=8, rule="nearest") == 5
    assert channels_to_keep(surviving=50, fan_in=10, out_channels=8, fillback_rate=0.5, rule="nearest") == 5 + 2


def test_regroup_to_channels_keeps_whole_top_rows():
    mask = torch.zeros(4, 2, 3, 3)
    mask[0, 0] = 1  # 9 weights survive
    mask[2] = 1  # 18 more: 27 of fan_in 18 -> n = 1.5, int(1.5) + 1 = 2 channels
    scores = torch.tensor([1.0, 0.5, 3.0, 2.0])
    new = regroup_to_channels(mask, scores)
    assert [bool(new[c].all()) for c in range(4)] == [False, False, True, True]
    assert [bool(new[c].any()) for c in range(4)] == [False, False, True, True]
    assert top_k_mask(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [True, True, False]  # ties: lower index


@pytest.mark.parametrize("name,expected", [
    ("x", (0.0, 0.5, 1.0)),
    ("x^2", (0.0, 0.25, 1.0)),
    ("x^3", (0.0, 0.125, 1.0)),
    ("exp", (0.0, math.exp(0.5) - 1, math.e - 1)),
    ("exp_custom", (0.0, (math.exp(0.5) - 1) / (math.e - 1), 1.0)),
    ("exp_custom_exponents", (0.0, (math.exp(0.5 ** 4) - 1) / (math.e - 1), 1.0)),
])
def test_schedules_at_start_middle_end(name, expected):
    assert [schedule_value(name, t, exponents=4) for t in (0.0, 0.5, 1.0)] == pytest.approx(expected)


def read_records(directory, kind):
    with open(paths.metrics_file(directory)) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


VIT = [*FAST, "--arch", "test_vit", "--pruning_times", "3", "--epochs", "2", "--rate", "0.5"]


def test_rsst_penalty_drives_the_dropped_weights_to_zero(tmp_path):
    directory = str(tmp_path / "rsst")
    result = run_main(*VIT, "--epochs", "4", "--struct", "rsst", "--vit_structured", "--criteria", "magnitude",
                      "--RST_schedule", "x", "--reg_granularity_prune", "2", "--save_dir", directory)
    assert "sparsity reads" in result.stdout  # the console says why sparsity lags during the round
    epochs = [r for r in read_records(directory, "epoch") if r["round"] == 1]
    norms = [r["penalized_l2"] for r in epochs]
    lambdas = [r["reg_lambda"] for r in epochs]
    assert lambdas == sorted(lambdas) and lambdas[-1] == pytest.approx(2.0, rel=0.02)  # last step: (T-1)/T
    assert norms == sorted(norms, reverse=True) and norms[-1] < 0.5 * norms[0]
    assert all(r["reg_lambda"] == 0.0 for r in read_records(directory, "epoch") if r["round"] == 0)


@pytest.mark.parametrize("mode", [["none"], ["refill"], ["regroup"], ["rsst"], ["rsst", "--vit_structured"],
                                  ["refill", "--vit_structured", "--fillback_rate", "0.1"]])
def test_three_rounds_of_each_mode(tmp_path, mode):
    directory = str(tmp_path / "run")
    run_main(*VIT, "--struct", *mode, "--epochs", "1", "--criteria", "l1", "--save_dir", directory)
    rounds = read_records(directory, "round")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r.get("struct_head") == (1 if "--vit_structured" in mode else None) for r in rounds)
    remaining = [r["remaining_pct"] for r in rounds]
    assert remaining[0] == 100.0 and remaining[0] > remaining[1] > remaining[2]
    final = checkpoint.load(paths.round_checkpoint(directory, 2))
    for name, mask in final["masks"].items():
        assert torch.all(final["model"][name][~mask] == 0), name
    if mode[0] in ("refill", "rsst") and "--vit_structured" not in mode:
        for name, mask in final["masks"].items():
            rows = mask.reshape(mask.shape[0], -1)
            assert torch.equal(rows.all(1), rows.any(1)), f"{name} is not channel-structured"


@pytest.mark.slow
def test_refill_on_resnet20(tmp_path):
    directory = str(tmp_path / "refill")
    run_main(*FAST, "--struct", "refill", "--criteria", "magnitude", "--rate", "0.3", "--pruning_times", "3",
             "--epochs", "1", "--save_dir", directory)
    rounds = read_records(directory, "round")
    assert abs(rounds[2]["remaining_pct"] - 49.0) < 5.0  # 0.7^2, up to whole-channel rounding
    masks = checkpoint.load(paths.round_checkpoint(directory, 2))["masks"]
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert torch.equal(rows.all(1), rows.any(1)), name
