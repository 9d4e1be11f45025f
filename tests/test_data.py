"""CIFAR readers (the real CIFAR-10 bundle; CIFAR-100 in its exact format), splits and the loader."""
import pickle

import numpy as np
import pytest
import torch

import data
from data.loader import TensorLoader, random_crop_flip


def test_cifar10_bundle_reads_with_a_held_out_validation_split(cifar10_root):
    splits = data.load("cifar10", cifar10_root)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45000, 5000, 10000)
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (3, 32, 32)
    assert splits.spec.num_classes == 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    means = torch.cat([splits.train.images, splits.val.images]).float().mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([125.3, 122.9, 113.9]), atol=0.6)  # the bundle's README


def write_cifar100(root, train=50, test=20):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", train), ("test", test)):
        batch = {b"filenames": [f"img{i}.png".encode() for i in range(count)], b"batch_label": name.encode(),
                 b"fine_labels": [i % 100 for i in range(count)], b"coarse_labels": [i % 20 for i in range(count)],
                 b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f, protocol=2)
    return folder


def test_cifar100_reader_on_files_in_the_official_format(tmp_path):
    folder = write_cifar100(tmp_path)
    splits = data.load("cifar100", str(tmp_path), val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 20)
    assert splits.spec.num_classes == 100
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    first = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32))
    assert torch.equal(splits.train.images[0], first)  # R, G, B planes, row by row
    assert splits.val.labels.tolist() == [i % 100 for i in range(40, 50)]  # the last training images


def test_cifar100_missing_meta_is_named(tmp_path):
    folder = write_cifar100(tmp_path)
    (folder / "meta").unlink()
    from utils.errors import UsageError
    with pytest.raises(UsageError, match="lacks meta"):
        data.load("cifar100", str(tmp_path))


def test_val_size_bounds_are_checked():
    from utils.errors import UsageError
    with pytest.raises(UsageError, match="--val_size 3000"):
        data.load("synthetic", "unused", val_size=3000)
    assert len(data.load("synthetic", "unused", val_size=0).val) == 0


def test_synthetic_set_is_identical_every_time():
    a, b = data.load("synthetic", "x"), data.load("synthetic", "y")
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert torch.bincount(a.test.labels).tolist() == [100] * 10


def test_crop_flip_translates_within_the_padding():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    for original, shifted in zip(images, out):
        # every nonzero pixel of the crop comes from the image (possibly flipped); the rest is zero padding
        values = set(original.flatten().tolist())
        assert set(shifted[shifted != 0].tolist()) <= values


def test_loader_is_deterministic_per_epoch_seed_and_drops_the_ragged_batch():
    splits = data.load("synthetic", "x")
    spec = splits.spec
    loader = TensorLoader(splits.train, 64, spec.mean, spec.std, torch.device("cpu"), train=True, drop_last=True)
    loader.set_epoch_seed(7)
    first = [(x.clone(), y.clone()) for x, y in loader]
    loader.set_epoch_seed(7)
    again = list(loader)
    loader.set_epoch_seed(8)
    other = list(loader)
    assert len(first) == len(loader) == 2700 // 64 and all(len(y) == 64 for _, y in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], other[0][1])
    evaluation = TensorLoader(splits.test, 300, spec.mean, spec.std, torch.device("cpu"), train=False)
    assert sum(len(y) for _, y in evaluation) == 1000
    x, _ = next(iter(evaluation))
    assert abs(float(x.mean())) < 0.6  # normalised
