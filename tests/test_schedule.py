"""Warm-up and LR milestones are resolved together: every round trains at the full --lr for at least
one epoch, and the config holds the effective values (issue 16 §8)."""
import pytest

from training.optim import effective_warmup, lr_at
from utils.cli import main, parse_config
from utils.config import RunConfig

STEPS = 7  # steps per epoch; any count gives the same epochs at full LR


def test_default_schedule_trains_at_full_lr_for_every_round_length():
    for epochs in range(1, 201):
        config = parse_config(["--epochs", str(epochs)])
        warmup, milestones = config.warmup, config.decreasing_lr
        assert (warmup, milestones) == config.schedule() and warmup == effective_warmup(config)
        assert 0 <= warmup < epochs and all(warmup < m < epochs for m in milestones), epochs
        at_full = [e for e in range(epochs) if lr_at(0.1, e, 0, STEPS, warmup, milestones) == 0.1]
        assert at_full and at_full[0] == warmup, (epochs, warmup, milestones)
        assert not milestones or milestones[0] > warmup


@pytest.mark.parametrize("argv,expected", [
    (["--epochs", "30"], (5, (15, 22))),  # was: ramp to 0.0096 over 20 epochs, then x0.1 at once
    (["--epochs", "24"], (4, (12, 18))),  # was: straight to lr/100
    (["--epochs", "120"], (20, (60, 90))),  # the original code's 120-epoch round is unchanged
    (["--epochs", "30", "--warmup", "20"], (20, (25, 27))),  # milestones follow an explicit warm-up
    (["--epochs", "120", "--decreasing_lr", "10"], (9, (10,))),  # the default warm-up ends before it
    (["--epochs", "10", "--warmup", "9"], (9, ())),
    (["--epochs", "1"], (0, ())),
])
def test_resolved_values(argv, expected):
    config = parse_config(argv)
    assert (config.warmup, config.decreasing_lr) == expected
    assert config.to_dict()["warmup"] == expected[0] and config.to_dict()["decreasing_lr"] == list(expected[1])


def test_milestone_inside_an_explicit_warmup_is_refused(capsys):
    assert main(["--epochs", "30", "--warmup", "20", "--decreasing_lr", "15,25"], run=lambda c: None) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--decreasing_lr 15" in err and "--warmup 20" in err, err


def test_replayed_config_resolves_to_itself():
    for argv in (["--epochs", "30"], ["--epochs", "30", "--warmup", "20"], ["--epochs", "10", "--warmup", "9"]):
        config = parse_config(argv)
        again = parse_config(["--epochs", str(config.epochs), "--warmup", str(config.warmup)]
                             + (["--decreasing_lr", ",".join(map(str, config.decreasing_lr))]
                                if config.decreasing_lr else []))
        assert again.config_hash() == config.config_hash()


def test_configs_saved_before_resolution_still_match():
    """Old checkpoints stored the defaults as warmup 20 and decreasing_lr []."""
    legacy = dict(parse_config([]).to_dict(), warmup=20, decreasing_lr=[])
    assert RunConfig.from_dict(legacy).config_hash() == parse_config([]).config_hash()
    short = dict(parse_config(["--epochs", "6"]).to_dict(), warmup=20, decreasing_lr=[])
    assert RunConfig.from_dict(short).schedule() == (1, (3, 4))
    changed = dict(parse_config(["--epochs", "30"]).to_dict(), warmup=20, decreasing_lr=[])
    assert RunConfig.from_dict(changed).config_hash() != parse_config(["--epochs", "30"]).config_hash()
