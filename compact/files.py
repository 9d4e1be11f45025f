"""A compact model on disk: DIR/arch.json (plain JSON) + DIR/model.safetensors (tensors only).

`load_compact(DIR)` builds the arch (models.create_model), gives it the plan's widths with its family's
`shrink`, and loads the tensors with safetensors: nothing is unpickled, so a compact export is safe to
load from anywhere. Every problem is one UsageError line naming the file.
"""
import os
from typing import Dict

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from compact.families import family_named
from models import create_model, is_known_arch
from utils.errors import UsageError
from utils.jsonfile import read_json

FORMAT = "imp-runner-compact/1"
ARCH_FILE, WEIGHTS_FILE, REPORT_FILE = "arch.json", "model.safetensors", "report.json"


def weights_bytes(model: nn.Module) -> bytes:
    """The safetensors serialisation of `model`'s state dict (contiguous CPU copies)."""
    return save({name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()})


def _read_arch(path: str) -> dict:
    """arch.json of a compact export, its schema checked; UsageError naming `path` otherwise."""
    arch = read_json(path, "compact arch file", UsageError)
    if arch.get("format") != FORMAT:
        raise UsageError(f"{path}: not a compact arch file (format is not {FORMAT!r})")
    for key, kind in (("arch", str), ("num_classes", int), ("family", str), ("plan", dict), ("input_shape", list)):
        if not isinstance(arch.get(key), kind):
            raise UsageError(f"{path}: {key!r} missing or not a {kind.__name__}")
    if not is_known_arch(arch["arch"]):
        raise UsageError(f"{path}: unknown arch {arch['arch']!r}")
    return arch


def build_skeleton(arch: dict, path: str) -> nn.Module:
    """The model of arch.json `arch` with its compact widths (weights still random)."""
    family = family_named(arch["family"], path)
    model = create_model(arch["arch"], arch["num_classes"])
    problem = family.check(arch["plan"], model)
    if problem:
        raise UsageError(f"{path}: plan does not fit --arch {arch['arch']}: {problem}")
    try:
        return family.shrink(model, arch["plan"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{path}: plan does not fit --arch {arch['arch']} ({type(exc).__name__}: {exc})") from None


def _check_state(state: Dict[str, torch.Tensor], model: nn.Module, path: str) -> None:
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise UsageError(f"{path}: tensors do not match arch.json (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UsageError(f"{path}: {name} has shape {tuple(state[name].shape)}, arch.json gives "
                             f"{tuple(tensor.shape)}")


def load_compact(directory: str, device: str = "cpu") -> nn.Module:
    """The compact model saved in `directory`, in eval mode on `device`.

    Reads arch.json and model.safetensors only (no pickle, no torch.load). Raises UsageError naming the
    file for a missing / unreadable file, an unknown arch or family, a plan that does not fit the arch,
    or tensors whose names or shapes differ from what arch.json describes.
    """
    arch_path, weights_path = os.path.join(directory, ARCH_FILE), os.path.join(directory, WEIGHTS_FILE)
    arch = _read_arch(arch_path)
    model = build_skeleton(arch, arch_path)
    try:
        state = load_file(weights_path, device="cpu")
    except FileNotFoundError:
        raise UsageError(f"{weights_path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    _check_state(state, model, weights_path)
    model.load_state_dict(state)
    return model.to(device).eval()
