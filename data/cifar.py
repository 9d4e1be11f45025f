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


class _ArraysOnly(pickle.Unpickler):
    """CIFAR pickles hold dicts of numpy arrays, lists and strings: refuse anything else, so a
    tampered data file cannot run code while it is read."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _ArraysOnly(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise UsageError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: not a CIFAR batch (holds a {type(raw).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _arrays(path: str, batch: dict, label_key: str):
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except KeyError as exc:
        raise UsageError(f"{path}: CIFAR batch lacks the key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: CIFAR batch holds unreadable arrays ({exc})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(data) != len(labels):
        raise UsageError(f"{path}: expected data of shape [N, 3072] with N labels, got {data.shape} "
                         f"and {labels.shape[0] if labels.ndim else 0} labels")
    return data, labels


def _read(paths: List[str], label_key: str) -> ImageSet:
    arrays = [_arrays(p, _unpickle(p), label_key) for p in paths]
    data = np.concatenate([a[0] for a in arrays])
    labels = np.concatenate([a[1] for a in arrays])
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
    return _read(paths[:5], "labels"), _read(paths[5:], "labels")


def read_cifar100(root: str) -> Tuple[ImageSet, ImageSet]:
    directory = _ensure("cifar100", root, "cifar-100-python", ["train", "test", "meta"])
    return (_read([os.path.join(directory, "train")], "fine_labels"),
            _read([os.path.join(directory, "test")], "fine_labels"))


DATASETS.register("cifar10")(DatasetSpec(
    num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    default_val_size=5000, read=read_cifar10))
DATASETS.register("cifar100")(DatasetSpec(
    num_classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    default_val_size=5000, read=read_cifar100))
