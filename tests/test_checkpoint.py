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


def flip_bytes_inside(path, tensor, count=16):
    """Flip `count` bytes in the middle of `tensor`'s raw data inside a saved file (a zip member torch
    reads without a CRC check)."""
    blob = bytearray(open(path, "rb").read())
    start = blob.find(tensor.numpy().tobytes())
    assert start > 0, "tensor bytes not found in the file"
    middle = start + tensor.numel() * tensor.element_size() // 2
    blob[middle:middle + count] = bytes(b ^ 0xFF for b in blob[middle:middle + count])
    with open(path, "wb") as f:
        f.write(blob)


def test_flipped_bytes_inside_a_tensor_are_detected(tmp_path):
    path = str(tmp_path / "2checkpoint.pth.tar")
    payload = make_payload(2)
    payload["model"]["w"] = torch.arange(4096.0)
    payload["masks"]["w"] = torch.ones(4096, dtype=torch.bool)
    checkpoint.save(path, payload)
    flip_bytes_inside(path, payload["model"]["w"])
    raw = torch.load(path, weights_only=True)  # torch itself loads the damaged file without complaint
    assert not torch.equal(raw["model"]["w"], payload["model"]["w"])
    with pytest.raises(CheckpointError, match="no longer matches the sha256 digest") as info:
        checkpoint.load(path)
    assert path in str(info.value)


def test_flipped_latest_falls_back_to_the_round_checkpoint(tmp_path):
    directory = str(tmp_path)
    checkpoint.save(paths.round_checkpoint(directory, 1), make_payload(1, epoch=5))
    latest = make_payload(2, epoch=3, kind="epoch")
    latest["model"]["w"] = torch.arange(2048.0)
    latest["masks"]["w"] = torch.ones(2048, dtype=torch.bool)
    checkpoint.save(paths.latest_checkpoint(directory), latest)
    flip_bytes_inside(paths.latest_checkpoint(directory), latest["model"]["w"])
    warnings = []
    path, payload = checkpoint.find_latest_valid(directory, log=warnings.append)
    assert path == paths.round_checkpoint(directory, 1) and payload["round"] == 1
    assert len(warnings) == 1 and "latest.pth.tar: damaged" in warnings[0]


def test_digest_covers_plain_values_and_ignores_list_or_tuple():
    base = {"a": [1, 2.5, None, "x"], "t": torch.ones(3)}
    assert checkpoint.content_digest(base) == checkpoint.content_digest({"t": torch.ones(3), "a": (1, 2.5, None, "x")})
    assert checkpoint.content_digest(base) != checkpoint.content_digest({**base, "a": [1, 2.5, None, "y"]})
    as_double = {**base, "t": torch.ones(3, dtype=torch.float64)}
    assert checkpoint.content_digest(base) != checkpoint.content_digest(as_double)


def test_truncated_file_message_is_one_whole_sentence(tmp_path):
    path = str(tmp_path / "1checkpoint.pth.tar")
    checkpoint.save(path, make_payload())
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a loadable checkpoint, truncated or damaged (") and "\n" not in message
    assert message.endswith("failed finding central directory)"), message  # torch's first sentence, whole
    assert "high likelihood" not in message


@pytest.mark.parametrize("content,needle", [
    ("{not json", "unreadable lineage file (JSONDecodeError: Expecting property name"),
    ('{"rounds": 3}', "not a lineage file (no list of rounds)"),
])
def test_bad_lineage_file_is_named(tmp_path, content, needle):
    path = paths.lineage_file(str(tmp_path))
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(CheckpointError) as info:
        checkpoint.read_lineage(str(tmp_path))
    assert str(info.value).startswith(f"{path}: {needle}")
    assert checkpoint.read_lineage(str(tmp_path / "empty")) == {"rounds": []}


def test_bad_feature_cache_index_is_a_value_error(tmp_path):
    from lowrank.cache import read_index
    (tmp_path / "index.json").write_text('["shards"]')
    with pytest.raises(ValueError, match=r"index.json: not a feature-cache index \(a JSON array, not an object\)$"):
        read_index(str(tmp_path))
