"""Seeding and RNG state capture, so a resumed run continues the same random streams."""
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def derived_seed(seed: int, *parts: int) -> int:
    """A stable seed for one (round, epoch, purpose) stream, independent of call order."""
    value = seed & 0xFFFFFFFF
    for part in parts:
        value = (value * 1_000_003 + int(part) + 0x9E3779B9) % (2 ** 63 - 1)
    return value


def runtime_settings() -> dict:
    """Settings outside the RNG that change floating-point results: CPU threads (reductions split
    differently) and deterministic kernels."""
    return {"threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def runtime_differences(rng_state: dict) -> list:
    """One phrase per runtime setting that differs from those a checkpoint's RNG state was saved with."""
    saved, now = rng_state.get("runtime"), runtime_settings()
    if not saved:
        return []
    names = {"threads": "torch threads", "deterministic": "deterministic algorithms",
             "cudnn_benchmark": "cudnn.benchmark"}
    return [f"{names[k]} {saved[k]} when saved, {now[k]} now" for k in names if k in saved and saved[k] != now[k]]


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "runtime": runtime_settings(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
