"""Every rejected flag: exit code 2, one line naming the flag, nothing written."""
import os

import pytest

from utils.cli import main, parse_config

BASE = ["--dataset", "synthetic", "--no_wandb"]


@pytest.mark.parametrize("argv,needle", [
    (["--rate", "0"], "--rate"),
    (["--rate", "1"], "--rate"),
    (["--rate", "abc"], "--rate"),
    (["--pruning_times", "0"], "--pruning_times"),
    (["--epochs", "0"], "--epochs"),
    (["--arch", "resnet9000"], "--arch"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--struct", "magic"], "--struct"),
    (["--prune_type", "foo"], "--prune_type"),
    (["--criteria", "entropy"], "--criteria"),
    (["--epochs", "10", "--decreasing_lr", "5,12"], "--decreasing_lr"),
    (["--epochs", "10", "--decreasing_lr", "7,3"], "--decreasing_lr"),
    (["--epochs", "10", "--warmup", "10"], "--warmup"),
    (["--prune_type", "rewind_lt", "--epochs", "5", "--rewind_epoch", "8"], "--rewind_epoch"),
    (["--val_size", "-1"], "--val_size"),
    (["--fillback_rate", "1.5"], "--fillback_rate"),
    (["--batch_size", "0"], "--batch_size"),
    (["--device", "tpu"], "--device"),
    (["--wandb_mode", "loud"], "--wandb_mode"),
    (["--no_such_flag"], "--no_such_flag"),
])
def test_bad_flags_exit_2_with_one_line(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(BASE + argv, run=lambda config: pytest.fail("must not start")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert os.listdir(tmp_path) == []


def test_cuda_device_without_cuda(tmp_path, monkeypatch, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    assert main(BASE + ["--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err


def test_unwritable_save_dir(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(BASE + ["--save_dir", str(blocker / "run")]) == 2
    assert "--save_dir" in capsys.readouterr().err


def test_missing_cifar_offline(tmp_path, monkeypatch, capsys):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    code = main(["--dataset", "cifar10", "--data", str(tmp_path / "nodata"), "--no_wandb", "--arch", "res20s",
                 "--struct", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--data" in err and "cifar10" in err, err
    assert os.listdir(tmp_path) == []


def test_defaults_follow_the_original_code():
    config = parse_config([])
    assert (config.dataset, config.arch, config.struct, config.batch_size, config.lr) == \
        ("cifar100", "res20s", "rsst", 128, 0.01)
    assert (config.epochs, config.warmup, config.pruning_times, config.rate, config.prune_type) == \
        (120, 20, 20, 0.2, "lt")
    assert (config.rewind_epoch, config.fillback_rate, config.RST_schedule, config.exponents) == \
        (24, 0.0, "exp_custom_exponents", 4)
    assert config.milestones() == (60, 90)
    assert parse_config(["--epochs", "80"]).milestones() == (40, 60)
    assert parse_config(["--decreasing_lr", "30,50"]).milestones() == (30, 50)


def test_config_hash_ignores_run_control():
    a = parse_config(["--exp_name", "a", "--pruning_times", "5"])
    b = parse_config(["--exp_name", "b", "--pruning_times", "20", "--resume", "--no_wandb"])
    c = parse_config(["--rate", "0.3"])
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_short_rounds_drop_milestones_at_epoch_zero():
    assert parse_config(["--epochs", "1"]).milestones() == ()
    assert parse_config(["--epochs", "2"]).milestones() == (1,)
    assert parse_config(["--epochs", "4"]).milestones() == (2, 3)


@pytest.mark.parametrize("argv,needle", [
    # issue 16 §8: all four were accepted silently
    (["--struct", "none", "--criteria", "saliency", "--fillback_rate", "0.5", "--reg_granularity_prune", "5"],
     "--criteria saliency: not used with --struct none"),
    (["--struct", "none", "--fillback_rate", "0.5"], "--fillback_rate 0.5: not used with --struct none"),
    (["--struct", "regroup", "--fillback_rate", "0.5"], "--fillback_rate 0.5: not used with --struct regroup"),
    (["--struct", "token", "--arch", "vit_tiny", "--fillback_rate", "0.5"], "--fillback_rate 0.5: not used"),
    (["--struct", "refill", "--reg_granularity_prune", "5"], "--reg_granularity_prune 5.0: not used with --struct"),
    (["--struct", "none", "--RST_schedule", "x"], "--RST_schedule x: not used with --struct none"),
    (["--struct", "rsst", "--RST_schedule", "x", "--exponents", "3"], "--exponents 3: not used with --RST_schedule x"),
    (["--struct", "rsst", "--block_size", "4"], "--block_size 4: not used with --struct rsst"),
    (["--struct", "refill", "--block_density", "0.9"], "--block_density 0.9: not used"),
    (["--struct", "rsst", "--token_keep", "30,20"], "--token_keep 30,20: not used with --struct rsst"),
    (["--struct", "none", "--k_anchors", "4"], "--k_anchors 4: not used"),
    (["--struct", "refill", "--vit_prune_target", "head"], "--vit_prune_target head: not used"),
    (["--struct", "none", "--vit_structured"], "--vit_structured: not used with --struct none"),
    (["--struct", "token", "--arch", "vit_tiny", "--prune_classifier"], "--fc/--prune_classifier: not used"),
    (["--struct", "token", "--arch", "vit_tiny", "--fc"], "--fc/--prune_classifier: not used"),
    (["--prune_type", "lt", "--rewind_epoch", "3"], "--rewind_epoch 3: not used with --prune_type lt"),
    (["--struct", "refill", "--criteria", "magnitude", "--criteria_batches", "8"],
     "--criteria_batches 8: not used with --criteria magnitude"),
    (["--epoch", "3"], "--epoch: unknown flag (did you mean --epochs?"),
    (["--prune", "lt"], "--prune: unknown flag"),
])
def test_flags_the_mode_does_not_read_are_refused(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(BASE + argv, run=lambda config: pytest.fail("must not start")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [
    # /work/shared/SPEC.md's everyday commands, and defaults repeated explicitly
    ["--arch", "vit_tiny", "--dataset", "cifar100", "--struct", "rsst", "--vit_structured", "--criteria", "magnitude",
     "--rate", "0.3", "--pruning_times", "20", "--epochs", "80", "--batch_size", "128", "--reg_granularity_prune",
     "1.0", "--RST_schedule", "exp_custom_exponents", "--exponents", "4", "--exp_name", "vit_rsst_head30"],
    ["--arch", "vit_tiny", "--dataset", "cifar100", "--struct", "refill", "--vit_structured", "--criteria",
     "magnitude", "--fillback_rate", "0.1", "--rate", "0.3", "--pruning_times", "20", "--epochs", "80"],
    ["--arch", "res20s", "--dataset", "cifar100", "--struct", "rsst", "--rate", "0.3"],
    ["--arch", "vit_tiny", "--struct", "rsst", "--vit_structured", "--criteria", "saliency", "--rate", "0.3"],
    ["--struct", "rsst", "--criteria", "magnitude", "--rate", "0.3"],
    ["--struct", "none", "--criteria", "l1", "--fillback_rate", "0", "--rewind_epoch", "24"],  # defaults: harmless
    ["--struct", "token", "--arch", "vit_tiny", "--token_keep", "30,20", "--k_anchors", "4", "--alpha", "0.3"],
    ["--struct", "regroup", "--block_size", "4", "--block_density", "0.7"],
    ["--prune_type", "rewind_lt", "--rewind_epoch", "3", "--workers", "8", "--print_freq", "10"],
])
def test_everyday_commands_are_accepted(argv):
    started = []
    assert main(argv, run=started.append) == 0 and len(started) == 1
