"""Channel-level regrouping of element-wise masks (refill, Chen et al., ICML 2022).

Pure functions: a layer's element-wise mask becomes whole output channels. The
number kept is the number of full channels that hold the surviving weights
(n = surviving / fan_in, rounded, at least one), plus (C_out - n) x
fillback_rate extra channels ("refill+"); which ones is decided by scores.
"""
import torch


def channels_to_keep(surviving: int, fan_in: int, out_channels: int, fillback_rate: float = 0.0) -> int:
    kept = max(1, min(out_channels, int(round(surviving / fan_in))))
    return min(out_channels, kept + int(round((out_channels - kept) * fillback_rate)))


def top_k_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` highest scores; ties go to the lower index."""
    order = torch.sort(-scores.detach().float().cpu(), stable=True).indices
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:count]] = True
    return keep


def expand_rows(keep_rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A mask shaped like `like` (a weight) that is all-1 on kept output rows."""
    shape = (-1,) + (1,) * (like.ndim - 1)
    return keep_rows.to(device=like.device, dtype=like.dtype).view(shape).expand_as(like).clone()


def regroup_to_channels(mask: torch.Tensor, scores: torch.Tensor, fillback_rate: float = 0.0) -> torch.Tensor:
    out_channels = mask.shape[0]
    fan_in = mask[0].numel()
    count = channels_to_keep(int((mask != 0).sum()), fan_in, out_channels, fillback_rate)
    return expand_rows(top_k_mask(scores, count), mask)
