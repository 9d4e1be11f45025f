"""CIFAR-10 / CIFAR-100 readers for the standard python-version pickle folders.

We read the pickles ourselves (torchvision's md5 check rejects re-encoded
copies) and download through torchvision only when the folder is missing.
"""
import os
import pickle
from typing import List, Tuple

import numpy as np
import torch

from data import DATASETS, DatasetSpec, ImageSet
from utils.errors import UsageError

CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise UsageError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: not a CIFAR batch (holds a {type(raw).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _to_imageset(path: str, batches: List[dict], label_key: str) -> ImageSet:
    try:
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    except KeyError as exc:
        raise UsageError(f"{path}: CIFAR batch lacks the key {exc.args[0]!r}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise UsageError(f"{path}: expected data of shape [N, 3072] with N labels, got {data.shape} "
                         f"and {len(labels)} labels")
    return ImageSet(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))


def _download(name: str, root: str) -> None:
    import torchvision
    dataset_class = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    created = not os.path.exists(root)
    try:
        os.makedirs(root, exist_ok=True)
        dataset_class(root, train=True, download=True)
    except Exception as exc:  # offline machines raise URLError/OSError/RuntimeError
        if created and not os.listdir(root):
            os.rmdir(root)  # leave no trace of a failed attempt
        raise UsageError(f"--data {root}: no {name} files there and the download failed "
                         f"(offline?): {str(exc).splitlines()[0][:160]}") from None


def _ensure(name: str, root: str, folder: str, files: List[str]) -> str:
    directory = os.path.join(root, folder)
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing and len(missing) == len(files):
        _download(name, root)
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise UsageError(f"--data {root}: {directory} lacks {', '.join(missing)}")
    return directory


def read_cifar10(root: str) -> Tuple[ImageSet, ImageSet]:
    directory = _ensure("cifar10", root, "cifar-10-batches-py", CIFAR10_FILES)
    paths = [os.path.join(directory, name) for name in CIFAR10_FILES]
    train = _to_imageset(directory, [_unpickle(p) for p in paths[:5]], "labels")
    test = _to_imageset(paths[5], [_unpickle(paths[5])], "labels")
    return train, test


def read_cifar100(root: str) -> Tuple[ImageSet, ImageSet]:
    directory = _ensure("cifar100", root, "cifar-100-python", ["train", "test", "meta"])
    train_path, test_path = os.path.join(directory, "train"), os.path.join(directory, "test")
    return (_to_imageset(train_path, [_unpickle(train_path)], "fine_labels"),
            _to_imageset(test_path, [_unpickle(test_path)], "fine_labels"))


def check_cifar10(root: str) -> None:
    _ensure("cifar10", root, "cifar-10-batches-py", CIFAR10_FILES)


def check_cifar100(root: str) -> None:
    _ensure("cifar100", root, "cifar-100-python", ["train", "test", "meta"])


DATASETS.register("cifar10")(DatasetSpec(
    num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    default_val_size=5000, read=read_cifar10, check=check_cifar10))
DATASETS.register("cifar100")(DatasetSpec(
    num_classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    default_val_size=5000, read=read_cifar100, check=check_cifar100))
