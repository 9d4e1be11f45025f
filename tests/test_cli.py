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
