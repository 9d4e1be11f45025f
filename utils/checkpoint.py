"""Checkpoints: atomic writes, safe validated loads, newest-valid lookup, lineage.

A checkpoint is a plain dict of tensors and plain Python types, so it loads with
`torch.load(weights_only=True)`: nothing in a file can execute code. Every file
written by `save` carries a sha256 `digest` of its content (tensor bytes, dtypes,
shapes and every plain value), checked by every load: torch's zip reader does not
check CRCs, so without it flipped bytes inside a tensor would load silently.
"""
import datetime
import hashlib
import io
import json
import os
import subprocess
import tempfile
import warnings
from typing import Iterable, List, Optional, Tuple, Type

import torch

from utils import paths
from utils.errors import CheckpointError, first_sentence
from utils.jsonfile import read_json

FORMAT = "imp-runner/1"
_UMASK = os.umask(0)
os.umask(_UMASK)
REQUIRED_KEYS = ("format", "kind", "round", "epoch", "model", "masks", "config", "config_hash", "lineage")


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=directory)
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # name the file being written, not the temp file
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, value, indent: int = 1, sort_keys: bool = False) -> None:
    """`value` as indented JSON plus a newline, written atomically (as atomic_write_text)."""
    atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


def content_digest(value) -> str:
    """sha256 (hex) of a checkpoint's content: dict keys and values, sequences, tensors (dtype, shape and
    raw bytes) and plain scalars. Lists and tuples hash alike (a saved tuple may load as either)."""
    digest = hashlib.sha256()

    def feed(item) -> None:
        if isinstance(item, torch.Tensor):
            flat = item.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"T{item.dtype}{tuple(item.shape)}".encode())
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
        elif isinstance(item, dict):
            digest.update(f"D{len(item)}".encode())
            for key in sorted(item, key=repr):
                digest.update(repr(key).encode())
                feed(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"L{len(item)}".encode())
            for element in item:
                feed(element)
        else:
            digest.update(f"V{type(item).__name__}:{item!r};".encode())
    feed(value)
    return digest.hexdigest()


@torch.no_grad()
def non_finite_tensors(named: Iterable[Tuple[object, object]]) -> List:
    """The names of the floating-point tensors among (name, value) pairs that hold a NaN or an infinity (values
    that are not tensors are passed over), e.g. `model.state_dict().items()`: what must not be trained on or
    saved as a model. One host sync when all are finite."""
    floats = [(name, value) for name, value in named if torch.is_tensor(value) and value.is_floating_point()]
    if not floats or bool(torch.stack([torch.isfinite(value).all() for _, value in floats]).all()):
        return []
    return [name for name, value in floats if not bool(torch.isfinite(value).all())]


def save(path: str, payload: dict) -> str:
    """Atomically save `payload` plus its `digest`; returns the sha256 of the bytes written."""
    buffer = io.BytesIO()
    payload = {key: value for key, value in payload.items() if key != "digest"}
    torch.save(dict(payload, digest=content_digest(payload)), buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_file(path: str) -> dict:
    """Load any of our .pth.tar files safely and check its content digest.

    Raises CheckpointError (one line naming `path`) for a missing, empty, truncated, unsafe or foreign
    file, and for one whose content no longer matches the digest it was saved with.
    """
    if os.path.isdir(path):
        found = sorted(name for name in os.listdir(path) if name.endswith((".pth.tar", ".pt", ".pth")))
        hint = (f"name one of its files, e.g. {os.path.join(path, found[0])}" if found
                else "it holds no checkpoint file (*.pth.tar, *.pt)")
        raise CheckpointError(f"{path}: a directory, not a checkpoint file; {hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file (zero bytes), not a checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/foreign/unsafe files
        raise CheckpointError(f"{path}: not a loadable checkpoint, truncated or damaged "
                              f"({first_sentence(exc)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(payload).__name__})")
    if "digest" in payload:
        stored = payload.pop("digest")
        if stored != content_digest(payload):
            raise CheckpointError(f"{path}: damaged, its content no longer matches the sha256 digest "
                                  f"it was saved with (flipped or overwritten bytes)")
    return payload


def load(path: str) -> dict:
    """Load and validate a round/epoch checkpoint."""
    payload = load_file(path)
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if payload.get("kind") == "rewind":
        raise CheckpointError(f"{path}: the run's rewind weights (no masks, no round); use a numbered "
                              f"<k>checkpoint.pth.tar of the run")
    if missing:
        raise CheckpointError(f"{path}: not a runner checkpoint (missing {', '.join(missing)})")
    if payload["format"] != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {payload['format']!r}, expected {FORMAT!r}")
    extra = set(payload["masks"]) - set(payload["model"])
    if extra:
        raise CheckpointError(f"{path}: masks name parameters the model lacks: {sorted(extra)[:3]}")
    for name, mask in payload["masks"].items():
        if tuple(mask.shape) != tuple(payload["model"][name].shape):
            raise CheckpointError(f"{path}: mask {name} has shape {tuple(mask.shape)}, "
                                  f"weight has {tuple(payload['model'][name].shape)}")
    return payload


def check_compatible(path: str, payload: dict, model_state: dict, config_dict: dict) -> None:
    """The checkpoint must come from the same architecture and dataset as this run, its model the same keys
    and shapes (CheckpointError naming `path`; naming both --struct values when the keys differ because the
    checkpoint was made by another struct mode)."""
    saved = payload["config"]
    for key in ("arch", "dataset"):
        if saved.get(key) != config_dict.get(key):
            raise CheckpointError(f"{path}: checkpoint is for --{key} {saved.get(key)}, this run uses "
                                  f"--{key} {config_dict.get(key)}")
    theirs, ours = payload["model"], model_state
    if set(theirs) != set(ours):
        diff = sorted(set(theirs) ^ set(ours))
        struct, theirs_struct = config_dict.get("struct"), saved.get("struct")
        if struct and theirs_struct and struct != theirs_struct:  # e.g. a merger or factorised layers
            raise CheckpointError(f"{path}: the checkpoint was saved by --struct {theirs_struct} and this run is "
                                  f"--struct {struct}; their models differ ({diff[:3]}), use --struct "
                                  f"{theirs_struct}")
        raise CheckpointError(f"{path}: model keys differ from --arch {config_dict.get('arch')} ({diff[:3]})")
    for name, tensor in ours.items():
        if tuple(theirs[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(theirs[name].shape)}, "
                                  f"the model expects {tuple(tensor.shape)}")


def progress_key(payload: dict) -> tuple:
    """Order of progress: later round first, then more epochs, then a finished round."""
    return (payload["round"], payload["epoch"], payload["kind"] == "round")


def find_latest_valid(directory: str, log=warnings.warn) -> Optional[tuple]:
    """(path, payload) of the most advanced valid checkpoint in a run dir, or None.

    Corrupt or truncated candidates are skipped with a warning naming them.
    """
    candidates = [paths.latest_checkpoint(directory)] + paths.numbered_checkpoints(directory)
    best = None
    for path in candidates:
        if not os.path.exists(path):
            continue
        try:
            payload = load(path)
        except CheckpointError as exc:
            log(f"skipping unusable checkpoint: {exc}")
            continue
        if best is None or progress_key(payload) > progress_key(best[1]):
            best = (path, payload)
        if paths.round_index_of(path) is not None:
            break  # numbered files come newest first: an older one can't be more advanced
    return best


def git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def lineage_record(config_hash: str, parent: Optional[str], parent_sha256: Optional[str]) -> dict:
    return {"config_hash": config_hash, "parent": parent, "parent_sha256": parent_sha256,
            "git_commit": git_commit(), "created": datetime.datetime.now().isoformat(timespec="seconds")}


def lineage_entry(payload: dict, sha: str) -> dict:
    """lineage.json's entry for a round checkpoint `payload` whose file has sha256 `sha`."""
    metrics, lineage = payload["metrics"], payload["lineage"]
    return {"round": payload["round"], "checkpoint": os.path.basename(metrics["checkpoint"]), "sha256": sha,
            "test_top1": metrics["test_top1"], "val_top1": metrics["val_top1"],
            "remaining_pct": metrics["remaining_pct"], "parent": lineage["parent"],
            "parent_sha256": lineage["parent_sha256"]}


def read_json_listing(path: str, list_key: str, kind: str, error: Type[Exception] = CheckpointError) -> dict:
    """The JSON object in `path` that holds a list under `list_key` (read_json, then that check). Raises
    `error` naming `path` and `kind` (what the file should be) when the file is missing, unreadable or not
    such an object."""
    value = read_json(path, kind, error)
    if not isinstance(value.get(list_key), list):
        raise error(f"{path}: not a {kind} (no list of {list_key})")
    return value


def read_lineage(directory: str) -> dict:
    """lineage.json of a run dir ({"rounds": []} when absent); CheckpointError when unreadable."""
    path = paths.lineage_file(directory)
    if not os.path.exists(path):
        return {"rounds": []}
    return read_json_listing(path, "rounds", "lineage file")


def record_round(directory: str, entry: dict, header: dict) -> None:
    """Add or replace this round's entry in lineage.json (idempotent, atomic)."""
    lineage = read_lineage(directory)
    lineage.update(header)
    rounds = [r for r in lineage.get("rounds", []) if r["round"] != entry["round"]] + [entry]
    lineage["rounds"] = sorted(rounds, key=lambda r: r["round"])
    atomic_write_text(paths.lineage_file(directory), json.dumps(lineage, indent=2) + "\n")


def remove_partial_writes(directory: str) -> None:
    """Temp files of writes a crash cut short (never read: only renamed files count)."""
    if os.path.isdir(directory):
        remove_quietly(os.path.join(directory, name) for name in os.listdir(directory)
                       if name.startswith(".tmp-") and name.endswith(".part"))


def remove_quietly(paths_to_remove: Iterable[str]) -> None:
    for path in paths_to_remove:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
