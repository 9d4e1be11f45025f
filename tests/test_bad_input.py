"""Corrupt, foreign or malicious checkpoints, a full disk, and broken CIFAR files, through the real CLI.

Runs go through `utils.cli.main(argv)` in-process (the same entry point as
main_imp_fillback.py, without paying for a new interpreter each time), so a
file write can be made to fail with ENOSPC by monkeypatching.
"""
import contextlib
import errno
import io
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import data
from utils import checkpoint, paths
from utils.cli import main

# test_vit (a tiny timm ViT) trains an epoch in about a second; res20s takes far longer on a busy CPU.
RUN = ["--dataset", "synthetic", "--arch", "test_vit", "--no_wandb", "--no_progress", "--batch_size", "64",
       "--lr", "0.05", "--struct", "none", "--rate", "0.5", "--pruning_times", "2", "--epochs", "1",
       "--val_size", "1800"]


pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two rounds of a small res20s run; tests copy it before changing anything."""
    directory = str(tmp_path_factory.mktemp("bad_input") / "finished")
    assert main(RUN + ["--save_dir", directory]) == 0
    return directory


def copy_of(directory, tmp_path):
    target = str(tmp_path / "run")
    shutil.copytree(directory, target)
    return target


# ---- --resume: a corrupt newest numbered checkpoint -----------------------------------------------------

def test_resume_falls_back_past_a_random_bytes_newest_checkpoint(finished, tmp_path, capsys):
    directory = copy_of(finished, tmp_path)
    newest = paths.round_checkpoint(directory, 1)
    with open(newest, "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    assert main(RUN + ["--save_dir", directory, "--resume"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: skipping unusable checkpoint: {newest}" in err
    assert f"resuming from {paths.round_checkpoint(directory, 0)}" in out
    assert checkpoint.load(newest)["round"] == 1  # round 1 was redone from round 0


def test_resume_with_every_checkpoint_corrupt_is_refused(finished, tmp_path, capsys):
    directory = copy_of(finished, tmp_path)
    open(paths.round_checkpoint(directory, 1), "wb").close()  # zero bytes
    with open(paths.round_checkpoint(directory, 0), "r+b") as f:
        f.truncate(100)
    before = sorted(os.listdir(directory))
    assert main(RUN + ["--save_dir", directory, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "empty file" in err and "0checkpoint.pth.tar" in err and f"no usable checkpoint in {directory}" in err
    assert sorted(os.listdir(directory)) == before


# ---- --resume_from: unreadable or foreign files ---------------------------------------------------------

def forge(source, target, **config_changes):
    payload = checkpoint.load(source)
    payload["config"] = {**payload["config"], **config_changes}
    checkpoint.save(target, payload)


def make_bad(kind, source, path):
    if kind == "zero_bytes":
        open(path, "wb").close()
    elif kind == "random_bytes":
        with open(path, "wb") as f:
            f.write(np.random.default_rng(1).bytes(10_000))
    elif kind == "truncated":
        with open(source, "rb") as f:
            blob = f.read()
        with open(path, "wb") as f:
            f.write(blob[: len(blob) // 2])
    elif kind == "plain_state_dict":
        torch.save({"state_dict": checkpoint.load(source)["model"]}, path)
    elif kind == "other_dataset":
        forge(source, path, dataset="cifar10")
    elif kind == "other_arch_forged_label":  # the label says res20s, the weights are test_vit's
        forge(source, path, arch="res20s")
    return path


@pytest.mark.parametrize("kind,argv,needle", [
    ("zero_bytes", [], "empty file"),
    ("random_bytes", [], "not a loadable checkpoint"),
    ("truncated", [], "not a loadable checkpoint"),
    ("plain_state_dict", [], "missing"),
    ("other_arch", ["--arch", "res20s"], "is for --arch test_vit, this run uses --arch res20s"),
    ("other_arch_forged_label", ["--arch", "res20s"], "model keys differ from --arch res20s"),
    ("other_dataset", [], "is for --dataset cifar10, this run uses --dataset synthetic"),
])
def test_resume_from_a_bad_file_exits_2_naming_it(finished, tmp_path, capsys, kind, argv, needle):
    source = paths.round_checkpoint(finished, 1)
    path = source if kind == "other_arch" else make_bad(kind, source, str(tmp_path / "1checkpoint.pth.tar"))
    branch = tmp_path / "branch"
    assert main(RUN + argv + ["--save_dir", str(branch), "--resume_from", path]) == 2
    line = one_line_error(capsys)
    assert path in line and needle in line, line
    assert not branch.exists()


class Exploit:
    """Unpickling this runs `exec`, which writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the raw pickle
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(finished, tmp_path, capsys, container):
    marker, path = tmp_path / "pwned", str(tmp_path / "1checkpoint.pth.tar")
    payload = {**checkpoint.load(paths.round_checkpoint(finished, 1)), "extra": Exploit(str(marker))}
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert main(RUN + ["--save_dir", str(tmp_path / "branch"), "--resume_from", path]) == 2
    assert path in one_line_error(capsys)
    assert not marker.exists() and not (tmp_path / "branch").exists()
    with open(path, "rb") as f:  # the exploit is live: an unsafe load would have run it
        torch.load(f, weights_only=False) if container == "torch_zip" else pickle.load(f)
    assert marker.read_text() == "pwned"


# ---- a full disk during a save --------------------------------------------------------------------------

def fail_replace_of(monkeypatch, name):
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src)
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", replace)


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory):
    """A run whose save of 1checkpoint.pth.tar hits ENOSPC: (run dir, exit code or exception, stderr)."""
    directory = str(tmp_path_factory.mktemp("disk_full") / "run")
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stderr(err):
        fail_replace_of(monkeypatch, "1checkpoint.pth.tar")
        try:
            outcome = main(RUN + ["--save_dir", directory])
        except OSError as exc:
            outcome = exc
    return directory, outcome, err.getvalue()


def test_disk_full_keeps_the_previous_checkpoint_and_resume_finishes(disk_full_run, capsys):
    directory, outcome, _ = disk_full_run
    assert outcome != 0
    assert not os.path.exists(paths.round_checkpoint(directory, 1))
    assert [n for n in os.listdir(directory) if n.startswith(".tmp-")] == []
    assert checkpoint.load(paths.round_checkpoint(directory, 0))["round"] == 0
    assert main(RUN + ["--save_dir", directory, "--resume"]) == 0  # space is back: nothing was lost
    assert checkpoint.load(paths.round_checkpoint(directory, 1))["round"] == 1


def test_disk_full_is_reported_in_one_line_naming_the_file(disk_full_run):
    directory, outcome, err = disk_full_run
    assert isinstance(outcome, int) and outcome != 0, f"main raised {outcome!r}"
    assert any("1checkpoint.pth.tar" in line and "No space left on device" in line for line in err.splitlines())


# ---- broken CIFAR files under --data --------------------------------------------------------------------

def write_cifar10(root, broken=None, shape=None):
    """A tiny cifar-10-batches-py (20 images a file); `broken` names a file to truncate or reshape."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in data.cifar.CIFAR10_FILES:
        width = shape if name == broken and shape else 3072
        batch = {b"data": rng.integers(0, 256, (20, width), dtype=np.uint8), b"labels": list(range(10)) * 2}
        blob = pickle.dumps(batch)
        (folder / name).write_bytes(blob[: len(blob) // 2] if name == broken and not shape else blob)
    return str(root)


def test_the_tiny_cifar_folder_is_valid(tmp_path):
    splits = data.load("cifar10", write_cifar10(tmp_path), val_size=10)
    assert len(splits.train) == 90 and len(splits.test) == 20  # so the failures below come from the damage


@pytest.mark.parametrize("broken,shape", [
    ("data_batch_3", None),
    ("test_batch", 100),
    pytest.param("data_batch_2", 100),
])
def test_broken_cifar_file_exits_2_naming_it(tmp_path, capsys, broken, shape):
    root = write_cifar10(tmp_path / "data", broken, shape)
    run_dir = tmp_path / "run"
    code = main(["--dataset", "cifar10", "--data", root, "--arch", "res20s", "--struct", "none", "--no_wandb",
                 "--save_dir", str(run_dir), "--val_size", "10"])
    line = one_line_error(capsys)
    assert code == 2 and broken in line, line
    assert ("3072" in line) if shape else ("not a readable CIFAR pickle" in line)
    assert not run_dir.exists()


# ---- flipped bytes: content that no longer matches the digest it was saved with -------------------------

def flip_inside_largest_tensor(path):
    """Flip 16 bytes in the middle of the largest model tensor's data (torch checks no CRC there)."""
    model = checkpoint.load_file(path)["model"]
    tensor = max(model.values(), key=lambda t: t.numel())
    blob = bytearray(open(path, "rb").read())
    start = blob.find(tensor.numpy().tobytes())
    assert start > 0
    middle = start + tensor.numel() * tensor.element_size() // 2
    blob[middle:middle + 16] = bytes(b ^ 0xFF for b in blob[middle:middle + 16])
    open(path, "wb").write(bytes(blob))


def test_resume_falls_back_past_a_checkpoint_with_flipped_bytes(finished, tmp_path, capsys):
    directory = copy_of(finished, tmp_path)
    newest = paths.round_checkpoint(directory, 1)
    flip_inside_largest_tensor(newest)
    assert main(RUN + ["--save_dir", directory, "--resume"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: skipping unusable checkpoint: {newest}: damaged" in err
    assert f"resuming from {paths.round_checkpoint(directory, 0)}" in out
    assert checkpoint.load(newest)["round"] == 1  # redone, and valid again


def test_resume_with_flipped_rewind_weights_is_refused(finished, tmp_path, capsys):
    directory = copy_of(finished, tmp_path)
    flip_inside_largest_tensor(paths.rewind_weights(directory))
    assert main(RUN + ["--save_dir", directory, "--resume"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"error: {paths.rewind_weights(directory)}: damaged or replaced"), line


def test_branch_from_a_file_with_flipped_bytes_is_refused(finished, tmp_path, capsys):
    source = str(tmp_path / "1checkpoint.pth.tar")
    shutil.copy(paths.round_checkpoint(finished, 1), source)
    flip_inside_largest_tensor(source)
    assert main(RUN + ["--save_dir", str(tmp_path / "branch"), "--resume_from", source]) == 2
    assert one_line_error(capsys).startswith(f"error: {source}: damaged")
    assert not (tmp_path / "branch").exists()


# ---- string and number flags that would write elsewhere, break a file format or trace back --------------

@pytest.mark.parametrize("argv,needle", [
    (["--seed", "-1"], "--seed -1: must be in [0, 2**32 - 1]"),
    (["--seed", "18446744073709551616"], "--seed 18446744073709551616: must be in [0, 2**32 - 1]"),
    (["--data", ""], "--data: empty path"),
    (["--data", "da\nta"], "--data 'da\\nta': contains a newline"),
    (["--save_dir", ""], "--save_dir: empty path"),
    (["--resume_from", ""], "--resume_from: empty path"),
    (["--exp_name", "../../h2_outside"], "--exp_name ../../h2_outside: must be a plain name"),
    (["--exp_name", "a\nb"], "--exp_name 'a\\nb': contains a newline"),
    (["--wandb_project", "p\nq"], "--wandb_project 'p\\nq': contains a newline"),
    (["--wandb_project", "team/p"], "--wandb_project 'team/p': must be non-empty and free of"),
])
def test_bad_text_and_seed_flags_exit_2_in_one_line(tmp_path, capsys, monkeypatch, argv, needle):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    save = [] if any(flag in argv for flag in ("--save_dir", "--exp_name")) else ["--save_dir", str(work / "run")]
    assert main(RUN + save + argv) == 2
    line = one_line_error(capsys)
    assert needle in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]  # nothing written, here or above


def test_non_utf8_save_dir_is_refused(tmp_path, capsys):
    target = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff")
    assert main(RUN + ["--save_dir", target]) == 2
    line = one_line_error(capsys)
    assert line.startswith("error: --save_dir") and line.endswith("not valid UTF-8"), line
    assert os.listdir(tmp_path) == []
