"""Pure mask math for dense-block regrouping.

From "Coarsening the Granularity: Towards Structurally Sparse Lottery Tickets"
(Chen et al., ICML 2022), section "refilling / regrouping": an element-wise
mask is turned into dense blocks that hardware can run as small dense GEMMs.
A layer's mask is viewed as a matrix (rows = output channels, columns =
fan-in C_in*kh*kw); rows are partitioned into groups of about `block_size`
that share surviving columns, and whole group x column blocks are kept,
densest first, within the layer's element-wise surviving count.

Three separate steps, as for heads and channels: grouping (`partition_rows`),
scoring (`block_scores`), selection (`select_blocks`). Tensors in, tensors out.
"""
import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

# METIS is deterministic for a fixed seed; fixing it makes the same mask give the same groups.
METIS_SEED = 0


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """(C_out, fan_in) view: a conv/linear weight per output channel; a 1-D weight is (n, 1)."""
    return tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)


def relabel_by_first_row(groups: torch.Tensor) -> torch.Tensor:
    """Group ids numbered in order of each group's first row, so labels don't depend on METIS's naming."""
    _, first_seen = np.unique(groups.numpy(), return_index=True)
    order = np.argsort(first_seen, kind="stable")
    new_id = np.empty(len(order), dtype=np.int64)
    new_id[order] = np.arange(len(order))
    _, dense_ids = np.unique(groups.numpy(), return_inverse=True)
    return torch.from_numpy(new_id[dense_ids])


def partition_rows(mask2d: torch.Tensor, block_size: int) -> torch.Tensor:
    """Group ids (LongTensor, one per row) putting rows that share surviving columns together.

    The paper partitions the hypergraph whose hyperedges are the columns (each
    column joins the rows that keep it). pymetis partitions graphs, so we use
    that hypergraph's clique expansion: every column adds 1 to the edge of each
    pair of rows keeping it, so an edge's weight is exactly the number of
    surviving columns the two rows share (M @ M^T off the diagonal). Cutting
    few of these weights keeps shared columns inside one group, which is what
    makes the group x column blocks dense. Rows are unit-weight vertices, so
    METIS balances groups to about `block_size` rows each.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    rows = mask2d.shape[0]
    num_groups = math.ceil(rows / block_size)
    if num_groups <= 1:
        return torch.zeros(rows, dtype=torch.long)
    if num_groups >= rows:
        return torch.arange(rows, dtype=torch.long)
    alive = (mask2d != 0).to(torch.float64).cpu()
    shared = (alive @ alive.T).round().to(torch.long)
    shared.fill_diagonal_(0)
    rows_idx, cols_idx = shared.nonzero(as_tuple=True)  # row-major, so already grouped by vertex
    starts = torch.zeros(rows + 1, dtype=torch.long)
    starts[1:] = torch.bincount(rows_idx, minlength=rows).cumsum(0)
    import pymetis  # imported here so the other struct modes run where pymetis is not installed
    adjacency = pymetis.CSRAdjacency(starts.numpy(), cols_idx.numpy())
    weights = shared[rows_idx, cols_idx].numpy() if rows_idx.numel() else None
    _, parts = pymetis.part_graph(num_groups, adjacency=adjacency, eweights=weights,
                                  options=pymetis.Options(seed=METIS_SEED))
    return relabel_by_first_row(torch.tensor(np.asarray(parts), dtype=torch.long))


def group_matrix(groups: torch.Tensor) -> torch.Tensor:
    """One-hot (num_groups, rows) float matrix: row sums over a group become one matmul."""
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    onehot = torch.zeros(num_groups, groups.numel(), dtype=torch.float64)
    onehot[groups, torch.arange(groups.numel())] = 1.0
    return onehot


def block_scores(mask2d: torch.Tensor, weight2d: torch.Tensor,
                 groups: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group x column block: (density, magnitude, rows in the group).

    density = fraction of the group's rows keeping that column; magnitude =
    summed |w| of the block's trained weights, which breaks density ties
    toward the blocks that matter more to the trained network.
    """
    onehot = group_matrix(groups)
    alive = (mask2d != 0).to(torch.float64).cpu()
    group_rows = onehot.sum(1)
    density = (onehot @ alive) / group_rows[:, None]
    magnitude = onehot @ weight2d.detach().abs().to(torch.float64).cpu()
    return density, magnitude, group_rows.to(torch.long)


def select_blocks(density: torch.Tensor, magnitude: torch.Tensor, group_rows: torch.Tensor,
                  budget: int, min_density: float) -> torch.Tensor:
    """Bool (num_groups, columns): blocks kept, densest first, at least `min_density` dense,
    never more than `budget` weights in total.

    Blocks cost their group's row count. Walking the ranked list, a block that
    would overshoot the budget is skipped rather than ending the walk, because
    groups differ in height by a row or two and a shorter block further down
    may still fit; this gets the layer as close to its element-wise count as
    the threshold allows.
    """
    if not 0.0 < min_density <= 1.0:
        raise ValueError(f"min_density must be in (0, 1], got {min_density}")
    num_groups, columns = density.shape
    flat_density, flat_magnitude = density.flatten(), magnitude.flatten()
    flat_cost = group_rows[:, None].expand(num_groups, columns).flatten()
    eligible = torch.nonzero((flat_density >= min_density - 1e-12) & (flat_density > 0)).flatten()
    # Two stable sorts give (density desc, magnitude desc, position asc): deterministic ranking.
    by_magnitude = eligible[torch.sort(flat_magnitude[eligible], descending=True, stable=True).indices]
    ranked = by_magnitude[torch.sort(flat_density[by_magnitude], descending=True, stable=True).indices]
    cost = flat_cost[ranked]
    kept = torch.zeros(num_groups * columns, dtype=torch.bool)
    prefix = int((cost.cumsum(0) <= budget).sum())  # the fast path: the top blocks that fit outright
    kept[ranked[:prefix]] = True
    remaining = budget - int(cost[:prefix].sum())
    rest, rest_cost = ranked[prefix:], cost[prefix:]
    while rest.numel():
        fits = torch.nonzero(rest_cost <= remaining).flatten()
        if not fits.numel():
            break
        first = int(fits[0])
        kept[rest[first]] = True
        remaining -= int(rest_cost[first])
        rest, rest_cost = rest[first + 1:], rest_cost[first + 1:]
    return kept.view(num_groups, columns)


def blocks_to_mask(kept: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Bool (rows, columns): each row takes its group's kept columns."""
    return kept[groups]


def regroup_layer(mask: torch.Tensor, weight: torch.Tensor, block_size: int,
                  density: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(block mask shaped and typed like `mask`, group id per row)."""
    mask2d, weight2d = as_matrix(mask), as_matrix(weight)
    budget = int((mask2d != 0).sum())
    groups = partition_rows(mask2d, block_size)
    if mask2d.numel() == 0:
        return mask.clone(), groups
    block_density, magnitude, group_rows = block_scores(mask2d, weight2d, groups)
    kept = select_blocks(block_density, magnitude, group_rows, budget, density)
    out = blocks_to_mask(kept, groups).view(mask.shape)
    return out.to(device=mask.device, dtype=mask.dtype), groups


def regroup_to_blocks(mask: torch.Tensor, weight: torch.Tensor, block_size: int, density: float) -> torch.Tensor:
    """The element-wise `mask` regrouped into dense row-group x column blocks (same shape/dtype)."""
    return regroup_layer(mask, weight, block_size, density)[0]


@dataclass(frozen=True)
class BlockStructure:
    groups: int            # row groups
    blocks: int            # group x column blocks holding any surviving weight
    dense_blocks: int      # blocks in which every row of the group survives
    dense_fraction: float  # surviving weights lying in dense blocks (1.0 = fully block-structured)


def block_structure(mask: torch.Tensor, groups: torch.Tensor) -> BlockStructure:
    """How block-structured `mask` is under a row grouping (e.g. the one `regroup_layer` used)."""
    alive = (as_matrix(mask) != 0).to(torch.float64).cpu()
    onehot = group_matrix(groups)
    counts = onehot @ alive
    full = counts == onehot.sum(1)[:, None]
    survivors = float(counts.sum())
    in_dense = float((counts * full).sum())
    return BlockStructure(groups=onehot.shape[0], blocks=int((counts > 0).sum()),
                          dense_blocks=int((full & (counts > 0)).sum()),
                          dense_fraction=in_dense / survivors if survivors else 1.0)
