"""Which runs of a sweep can train together as one fused model, and which cannot.

Runs fuse when their models have the same shapes, their epochs the same number of equal batches and
their steps the same shared settings: the fields of `SHARED_FIELDS` are equal. Everything else may
differ per run (seed, rate, criteria, lr and its schedule, weight decay, RSST schedule and lambda,
prune type, branch). A run that fused training cannot take at all (`unfusable`), or whose --fused_route
cannot take its arch (`route_problem`, which builds one model on the meta device), is refused, naming the
flag. Otherwise pure functions over RunConfig: no files, no torch state.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from data import resolve_val_size
from utils.config import RunConfig

# What a fused group shares: the model's shapes (arch, dataset), the batches of an epoch (dataset, data,
# val_size, batch_size), the rounds' lengths (epochs, pruning_times: cells step in lockstep), which weights
# are masked (struct, conv1, prune_classifier), and the one step all cells take (momentum and nan_policy are
# FusedTrainStep's; amp, device, graph, compile, channels_last, deterministic, fused_route are process-wide).
SHARED_FIELDS = ("arch", "dataset", "data", "val_size", "batch_size", "epochs", "pruning_times", "struct",
                 "conv1", "prune_classifier", "momentum", "nan_policy", "amp", "device", "cuda_graph", "compile",
                 "channels_last", "deterministic", "fused_route")


def fusion_key(config: RunConfig) -> Tuple:
    """The values of SHARED_FIELDS (val_size resolved: the default and the same size given agree)."""
    values = config.to_dict()
    values["val_size"] = resolve_val_size(config.dataset, config.val_size)
    return tuple((name, _hashable(values[name])) for name in SHARED_FIELDS)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def unfusable(config: RunConfig) -> Optional[str]:
    """Why fused training cannot run `config` (a text naming the flag), or None when it can.

    Struct modes that change layers or the forward (lowrank, merge, token) do not fit one fused model
    across rounds. (--nan_policy skip_batch fuses: FusedTrainStep skips per cell.)"""
    from pruners import STRUCTS
    from pruners.reshaping import ShapeChangingMode
    mode = STRUCTS[config.struct]
    if issubclass(mode, ShapeChangingMode) or mode.changes_forward or not mode.masks_weights:
        return f"--struct {config.struct} changes the model's layers or forward, so its runs cannot be fused"
    return None


def route_problem(config: RunConfig) -> Optional[str]:
    """Why `--fused_route` cannot fuse `--arch` (a line naming both flags and the route to use), or None. Asks
    the route (FusedModel.refusal) about one model built on the meta device (no memory, no data)."""
    if config.fused_route == "auto":  # auto picks a route that fits
        return None
    import torch
    from data import DATASETS
    from models import create_model
    from training.fused.fuse import route_refusal
    with torch.device("meta"):
        model = create_model(config.arch, DATASETS[config.dataset].num_classes)
    reason = route_refusal(config.fused_route, model)
    if reason:
        return f"--fused_route {config.fused_route} with --arch {config.arch}: {reason}; use --fused_route auto or streams"
    return None


def group_cells(configs: Sequence[RunConfig], size: int,
                key: Callable[[RunConfig], Tuple] = fusion_key) -> List[List[int]]:
    """Indices of `configs` in fused groups of at most `size` (>= 1) runs with equal `key`: keys in order of
    first appearance, members in input order, the runs of one key split into as few groups as `size`
    allows, of sizes differing by at most one (5 runs, size 4 -> 2 + 3, not 4 + 1: two fused groups).
    E.g. keys a, b, a, a with size 2 -> [[0], [2, 3], [1]]. Raises ValueError for size < 1."""
    if size < 1:
        raise ValueError(f"fused group size {size}: must be at least 1")
    by_key: Dict[Tuple, List[int]] = {}
    for index, config in enumerate(configs):
        by_key.setdefault(key(config), []).append(index)
    groups = []
    for members in by_key.values():
        count = -(-len(members) // size)
        bounds = [len(members) * k // count for k in range(count + 1)]
        groups += [members[bounds[k]:bounds[k + 1]] for k in range(count)]
    return groups


def differences(first: RunConfig, other: RunConfig) -> List[str]:
    """The shared fields in which `other` differs from `first`, as `--flag A vs B` texts."""
    a, b = dict(fusion_key(first)), dict(fusion_key(other))
    return [f"--{name} {a[name]} vs {b[name]}" for name in SHARED_FIELDS if a[name] != b[name]]
