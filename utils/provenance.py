"""Provenance of a run dir: what ran it, where, with which code and packages.

Every process that starts or resumes a run appends one record to `provenance.json`, so a run that was
resumed on another machine (or after a `git pull`) shows each of its pieces: the exact command line,
host, package versions, GPU, and the git commit with a dirty flag (uncommitted changes to tracked files).
"""
import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from utils import paths
from utils.checkpoint import atomic_write_text, git_commit

PACKAGES = ("torch", "torchvision", "timm", "numpy", "wandb", "transformers", "peft", "safetensors",
            "torch-pruning", "submitit", "open_clip_torch", "matplotlib")


def package_versions(names=PACKAGES) -> Dict[str, Optional[str]]:
    """{distribution name: installed version, or None when it is not installed}."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_dirty() -> Optional[bool]:
    """True when tracked files of this checkout differ from its commit; None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def gpus() -> List[str]:
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def collect(argv: Optional[List[str]] = None) -> dict:
    """This process's provenance record (plain JSON types)."""
    return {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.executable, *(sys.argv if argv is None else argv)],
        "cwd": os.getcwd(), "host": socket.gethostname(), "pid": os.getpid(),
        "python": platform.python_version(), "platform": platform.platform(),
        "packages": package_versions(),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpus": gpus(),
        "git": {"commit": git_commit(), "dirty": git_dirty()},
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "torchrun": torchrun_launch(),
    }


def torchrun_launch() -> Optional[dict]:
    """Under torchrun, what launched this worker (the worker's own "command" is `python main_imp_fillback.py
    ...`; torchrun's line is not visible to it): {"nproc_per_node", "nnodes", "rendezvous"}; None otherwise."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" not in env or "WORLD_SIZE" not in env:
        return None
    per_node = int(env["LOCAL_WORLD_SIZE"])
    return {"nproc_per_node": per_node, "nnodes": int(env["WORLD_SIZE"]) // max(per_node, 1),
            "rendezvous": f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"}


def read(directory: str) -> List[dict]:
    """The provenance records of a run dir, oldest first ([] when absent or unreadable)."""
    try:
        with open(paths.provenance_file(directory)) as f:
            records = json.load(f).get("starts", [])
    except (OSError, ValueError, AttributeError):
        return []
    return records if isinstance(records, list) else []


def record_start(directory: str, argv: Optional[List[str]] = None) -> dict:
    """Append this process's record to the run dir's provenance.json (atomically); returns it."""
    record = collect(argv)
    atomic_write_text(paths.provenance_file(directory),
                      json.dumps({"starts": read(directory) + [record]}, indent=2) + "\n")
    return record
