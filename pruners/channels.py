"""Channel-level regrouping of element-wise masks (refill, Chen et al., ICML 2022).

Pure functions: a layer's element-wise mask becomes whole output channels. With
n = surviving / fan_in (the channels the survivors would fill, a float), the
count kept is, by `--refill_count`:

  reference  min(C, int(n + (C - n) * fillback_rate) + 1): Structure-LTH's
             `prune_model_custom_fillback` takes the (C - int_channel)-th smallest
             score as a threshold and keeps every channel above it *and* the
             threshold channel itself, i.e. one more than its formula (all C when
             the formula already gives C). The default, so published numbers compare.
  nearest    min(C, max(1, round(n)) + round((C - max(1, round(n))) * fillback_rate)),
             with Python's round() (halves to even: round(2.5) == 2).

Which channels: the highest scores (`--criteria`), ties to the lower index (the
reference picks at random among ties at the threshold).
"""
import torch

REFILL_COUNTS = ("reference", "nearest")


def channels_to_keep(surviving: int, fan_in: int, out_channels: int, fillback_rate: float = 0.0,
                     rule: str = "reference") -> int:
    """Whole output channels kept for `surviving` element-wise survivors of an [out_channels, fan_in] mask.

    Raises ValueError for an unknown `rule` or a fillback_rate outside [0, 1].
    """
    if not 0.0 <= fillback_rate <= 1.0:
        raise ValueError(f"fillback_rate must be in [0, 1], got {fillback_rate}")
    if rule == "reference":
        # n in float32 as the reference computes it (count.sum().float() / fan_in), the rest in Python floats
        n = float(torch.tensor(float(surviving)) / fan_in)
        return min(out_channels, int(n + (out_channels - n) * fillback_rate) + 1)
    if rule == "nearest":
        kept = max(1, min(out_channels, int(round(surviving / fan_in))))
        return min(out_channels, kept + int(round((out_channels - kept) * fillback_rate)))
    raise ValueError(f"unknown refill count rule {rule!r}; choose from {', '.join(REFILL_COUNTS)}")


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


def regroup_to_channels(mask: torch.Tensor, scores: torch.Tensor, fillback_rate: float = 0.0,
                        rule: str = "reference") -> torch.Tensor:
    """Whole-channel mask for an element-wise `mask` [C_out, ...] given per-channel `scores` [C_out]."""
    out_channels = mask.shape[0]
    fan_in = mask[0].numel()
    count = channels_to_keep(int((mask != 0).sum()), fan_in, out_channels, fillback_rate, rule)
    return expand_rows(top_k_mask(scores, count), mask)
