"""Atomic checkpoint writes, safe loads and the newest-valid lookup."""
import os
import pickle

import pytest
import torch

from utils import checkpoint, paths
from utils.errors import CheckpointError


def make_payload(round_index=0, epoch=1, kind="round"):
    return {"format": checkpoint.FORMAT, "kind": kind, "round": round_index, "epoch": epoch,
            "model": {"w": torch.arange(6.0).view(2, 3)}, "masks": {"w": torch.ones(2, 3, dtype=torch.bool)},
            "config": {"arch": "res20s", "dataset": "synthetic"}, "config_hash": "abc", "lineage": {}}


def test_round_trip_and_sha(tmp_path):
    path = str(tmp_path / "0checkpoint.pth.tar")
    sha = checkpoint.save(path, make_payload())
    assert sha == checkpoint.sha256_of(path)
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0).view(2, 3))
    assert [name for name in os.listdir(tmp_path) if name.startswith(".tmp")] == []


@pytest.mark.parametrize("content,needle", [
    (b"", "empty file"),
    (b"\x00\x01garbage" * 10, "not a loadable checkpoint"),
])
def test_unreadable_files_are_named(tmp_path, content, needle):
    path = tmp_path / "3checkpoint.pth.tar"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle) as info:
        checkpoint.load(str(path))
    assert str(path) in str(info.value)


def test_truncated_file_is_refused(tmp_path):
    path = str(tmp_path / "1checkpoint.pth.tar")
    checkpoint.save(path, make_payload())
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="1checkpoint"):
        checkpoint.load(path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_not_executed(tmp_path):
    path = str(tmp_path / "evil.pth.tar")
    torch.save({"format": checkpoint.FORMAT, "payload": Exploit()}, path, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        checkpoint.load(path)
    with open(path, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(CheckpointError):
        checkpoint.load(path)


def test_foreign_dict_is_refused(tmp_path):
    path = str(tmp_path / "model.pth")
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load(path)


def test_latest_valid_skips_corrupt_newest(tmp_path):
    directory = str(tmp_path)
    checkpoint.save(paths.round_checkpoint(directory, 0), make_payload(0))
    checkpoint.save(paths.round_checkpoint(directory, 1), make_payload(1))
    with open(paths.round_checkpoint(directory, 2), "wb") as f:
        f.write(b"half a checkpoint")
    warnings = []
    path, payload = checkpoint.find_latest_valid(directory, log=warnings.append)
    assert path == paths.round_checkpoint(directory, 1) and payload["round"] == 1
    assert len(warnings) == 1 and "2checkpoint.pth.tar" in warnings[0]


def test_epoch_checkpoint_of_next_round_wins(tmp_path):
    directory = str(tmp_path)
    checkpoint.save(paths.round_checkpoint(directory, 1), make_payload(1, epoch=5))
    checkpoint.save(paths.latest_checkpoint(directory), make_payload(2, epoch=3, kind="epoch"))
    path, payload = checkpoint.find_latest_valid(directory)
    assert path == paths.latest_checkpoint(directory) and (payload["round"], payload["epoch"]) == (2, 3)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "0checkpoint.pth.tar")
    checkpoint.save(path, make_payload(epoch=1))

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(path, make_payload(epoch=2))
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert [name for name in os.listdir(tmp_path) if name.startswith(".tmp")] == []
