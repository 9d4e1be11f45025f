"""Feature cache: per-image features [N tokens, D] as sharded safetensors plus an index.

Layout of a cache directory:
    index.json              {encoder, encoder_config, dtype, shape [N, D], count, shard_size, complete,
                             shards: [{file, count, done}]}
    shard_00000.safetensors key "features": [n_in_shard, N, D]

Each shard and each index update is written atomically (temp file + fsync + rename), and a shard is
listed as done only after its file is in place, so an extraction killed at any point resumes from
its last done shard (`resume_point`) without recomputing the done ones.
"""
import bisect
import json
import os
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from utils.checkpoint import atomic_write_bytes, atomic_write_json, read_json_listing

INDEX = "index.json"
KEY = "features"
DTYPES: Dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_name(number: int) -> str:
    return f"shard_{number:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"cache dtype {dtype}: choose from {', '.join(DTYPES)}")


def read_index(out_dir: str) -> Optional[dict]:
    """index.json of `out_dir` as a dict, None when there is none; ValueError when unreadable."""
    path = os.path.join(out_dir, INDEX)
    if not os.path.isfile(path):
        return None
    return read_json_listing(path, "shards", "feature-cache index", ValueError)


def resume_point(out_dir: str, encoder: str, encoder_config: dict, shard_size: int = 256,
                 dtype: torch.dtype = torch.float16) -> int:
    """Number of samples already stored in done shards of `out_dir` (0 for a new cache).

    Raises ValueError naming the directory when the cache there was written by another encoder,
    encoder config, dtype or shard size (its features could not be continued by this run).
    """
    index = read_index(out_dir)
    if index is None:
        return 0
    theirs = (index.get("encoder"), index.get("encoder_config"), index.get("dtype"), index.get("shard_size"))
    ours = (encoder, json.loads(json.dumps(encoder_config)), _dtype_name(dtype), shard_size)
    labels = ("encoder", "encoder config", "dtype", "shard size")
    for label, saved, wanted in zip(labels, theirs, ours):
        if saved != wanted:
            raise ValueError(f"{out_dir}: a cache of {label} {saved!r} is there, this run uses {wanted!r} "
                             f"(choose another --out or delete it)")
    return sum(shard["count"] for shard in index["shards"] if shard["done"])


def write_cache(out_dir: str, encoder: str, encoder_config: dict, features: Iterable[torch.Tensor],
                shard_size: int = 256, dtype: torch.dtype = torch.float16, start: Optional[int] = None,
                total: Optional[int] = None) -> dict:
    """Store `features` (an iterable of [N, D] tensors) as a sharded cache in `out_dir`; returns the index.

    Resumable: samples in shards already done are not written again. With `start=None` the iterable
    holds every sample from 0 and those of done shards are consumed and dropped; a caller that can
    skip work passes `start=resume_point(...)` and an iterable beginning at sample `start`.
    `total` (optional) lists the planned shards in the index as not done, for progress reports.
    Raises ValueError for another encoder's cache, a `start` that is not the resume point, features
    of mixed shapes (naming the sample) and a shard size below 1.
    """
    if shard_size < 1:
        raise ValueError(f"shard size {shard_size}: must be at least 1")
    os.makedirs(out_dir, exist_ok=True)
    done = resume_point(out_dir, encoder, encoder_config, shard_size, dtype)
    if start is not None and start != done:
        raise ValueError(f"{out_dir}: features start at sample {start}, the cache resumes at sample {done}")
    index = read_index(out_dir) or {"encoder": encoder, "encoder_config": json.loads(json.dumps(encoder_config)),
                                    "dtype": _dtype_name(dtype), "shard_size": shard_size, "shape": None,
                                    "count": 0, "complete": False, "shards": []}
    index["shards"] = [shard for shard in index["shards"] if shard["done"]]
    if index.get("complete"):
        return index
    if total is not None:
        _plan(index, total, shard_size)
    items: Iterator[torch.Tensor] = iter(features)
    if start is None:
        for _ in range(done):
            if next(items, None) is None:
                break
    number, pending = len([s for s in index["shards"] if s["done"]]), []
    for offset, sample in enumerate(items):
        index["shape"] = _check_shape(index["shape"], sample, done + offset)
        pending.append(sample.detach().to("cpu", dtype))
        if len(pending) == shard_size:
            _write_shard(out_dir, index, number, pending)
            number, pending = number + 1, []
    if pending:
        _write_shard(out_dir, index, number, pending)
    index["shards"] = [shard for shard in index["shards"] if shard["done"]]
    index["complete"] = True
    atomic_write_json(os.path.join(out_dir, INDEX), index, indent=1)
    return index


def _plan(index: dict, total: int, shard_size: int) -> None:
    done = [shard for shard in index["shards"] if shard["done"]]
    stored = sum(shard["count"] for shard in done)
    planned, number = [], len(done)
    while stored < total:
        count = min(shard_size, total - stored)
        planned.append({"file": shard_name(number), "count": count, "done": False})
        stored, number = stored + count, number + 1
    index["shards"] = done + planned


def _check_shape(shape: Optional[List[int]], sample: torch.Tensor, position: int) -> List[int]:
    if sample.dim() != 2 or (shape is not None and list(sample.shape) != list(shape)):
        wanted = "[N, D]" if shape is None else str(list(shape))
        raise ValueError(f"feature of sample {position} has shape {list(sample.shape)}, expected {wanted}")
    return list(sample.shape)


def _write_shard(out_dir: str, index: dict, number: int, samples: Sequence[torch.Tensor]) -> None:
    name = shard_name(number)
    atomic_write_bytes(os.path.join(out_dir, name), safetensors_bytes({KEY: torch.stack(samples).contiguous()}))
    entry = {"file": name, "count": len(samples), "done": True}
    shards = [shard for shard in index["shards"] if shard["file"] != name]
    index["shards"] = sorted(shards + [entry], key=lambda shard: shard["file"])
    index["count"] = sum(shard["count"] for shard in index["shards"] if shard["done"])
    atomic_write_json(os.path.join(out_dir, INDEX), index, indent=1)


def split_indices(count: int, val_fraction: float = 0.1, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train_idx, val_idx) of `count` samples: a seeded permutation, the first
    round(count * val_fraction) (at least 1) of it for validation. Sorted int64 tensors.
    Raises ValueError for fewer than 2 samples or a fraction outside (0, 1)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"validation fraction {val_fraction}: must be between 0 and 1")
    if count < 2:
        raise ValueError(f"{count} cached sample(s): a train/validation split needs at least 2")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held_out = min(count - 1, max(1, round(count * val_fraction)))
    return order[held_out:].sort().values, order[:held_out].sort().values


class FeatureCache:
    """Read access to a finished cache directory: `cache[i]` is float32 [N, D].

    Raises ValueError naming the path for a missing directory, a missing or empty index, an
    unfinished extraction (rerun extract_features.py to resume it) and a missing shard file.
    """
    split_indices = staticmethod(split_indices)

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise ValueError(f"{path}: no such feature cache directory")
        index = read_index(path)
        if index is None:
            raise ValueError(f"{path}: not a feature cache (no {INDEX})")
        if not index.get("complete"):
            raise ValueError(f"{path}: extraction not finished ({index.get('count', 0)} samples so far); "
                             f"rerun extract_features.py with the same flags to resume it")
        if index.get("count", 0) == 0:
            raise ValueError(f"{path}: empty feature cache (0 samples)")
        for shard in index["shards"]:
            if not os.path.isfile(os.path.join(path, shard["file"])):
                raise ValueError(f"{path}: shard {shard['file']} listed in {INDEX} is missing")
        self.index = index
        self.shape: Tuple[int, int] = tuple(index["shape"])
        self.encoder: str = index["encoder"]
        self._starts = torch.tensor([0] + [s["count"] for s in index["shards"]]).cumsum(0).tolist()

    def __len__(self) -> int:
        return self.index["count"]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.path}: sample {i} out of range (cache holds {len(self)})")
        i %= len(self)
        number = bisect.bisect_right(self._starts, i) - 1
        with safe_open(os.path.join(self.path, self.index["shards"][number]["file"]), framework="pt") as f:
            return f.get_slice(KEY)[i - self._starts[number]].float()

    def load_all(self) -> torch.Tensor:
        """Every sample as one float32 tensor [count, N, D]."""
        parts = []
        for shard in self.index["shards"]:
            with safe_open(os.path.join(self.path, shard["file"]), framework="pt") as f:
                parts.append(f.get_tensor(KEY).float())
        return torch.cat(parts)
