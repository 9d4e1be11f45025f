"""`visualize_svd_nn.py`: one cached sample as maps over its token grid, original / SVD / learned, and errors.

    python visualize_svd_nn.py --features cache --results_dir results --image_idx 3

Writes two PNGs into --out_dir (default RESULTS_DIR/visualize):
    image<K>_channels.png  the first 8 channels over the token grid (e.g. 16 x 16): one row for the
                           original, one for the per-sample SVD at each learned rank, one per learned model;
                           each column shares one colour scale
    image<K>_errors.png    |original - reconstruction| of the same channels, and in the last column the
                           per-token error norm over all D channels; one row per method, shared scales
Prefix tokens (a class token, registers) are dropped so that the rest fill a square grid.
"""
import argparse
import math
import os
from typing import Dict, Optional, Sequence

import torch

from lowrank import baselines
from lowrank.cache import FeatureCache
from lowrank.compare import DEFAULT_ARCHS, load_models
from utils.errors import UsageError, run_cli

CHANNELS = 8
MAX_PREFIX = 8


def grid_prefix(tokens: int) -> int:
    """Prefix tokens to drop so that the others form a square grid: the smallest p in 0..8 with
    N - p a perfect square (65 -> 1, 256 -> 0, 197 -> 1). Raises UsageError when there is none."""
    for prefix in range(min(MAX_PREFIX, tokens - 1) + 1):
        side = math.isqrt(tokens - prefix)
        if side * side == tokens - prefix:
            return prefix
    raise UsageError(f"{tokens} tokens do not fill a square grid after dropping up to {MAX_PREFIX} prefix tokens; "
                     f"pass --prefix_tokens")


def token_maps(x: torch.Tensor, prefix: int, channels: int = CHANNELS) -> torch.Tensor:
    """x [N, D] -> the first `channels` channels over the token grid, [channels, side, side]."""
    grid = x[prefix:]
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
        raise UsageError(f"--prefix_tokens {prefix}: {grid.shape[0]} remaining tokens are not a square grid")
    return grid[:, :channels].T.reshape(-1, side, side)


def error_maps(x: torch.Tensor, x_hat: torch.Tensor, prefix: int, channels: int = CHANNELS) -> torch.Tensor:
    """|x - x_hat| of the first `channels` channels plus the per-token error norm: [channels + 1, side, side]."""
    residual = (x - x_hat).abs()
    norm = residual[prefix:].pow(2).sum(-1).sqrt()
    side = math.isqrt(norm.shape[0])
    return torch.cat([token_maps(residual, prefix, channels), norm.reshape(1, side, side)])


def reconstructions(x: torch.Tensor, models: Dict[str, torch.nn.Module], rank: int) -> Dict[str, torch.Tensor]:
    """{"SVD r=<r>": ..., "<arch> r=<r'>": ...} reconstructions of one sample x [N, D] (float64): the SVD
    at `rank` and at every learned model's rank r' (at most min(N, D))."""
    ranks = sorted({rank} | {min(int(model.rank), min(x.shape)) for model in models.values()})
    out = {f"SVD r={r}": baselines.svd_reconstruct(x[None], r)[0] for r in ranks}
    for name, model in models.items():
        with torch.no_grad():
            a, b = model(x[None].float())
        out[f"{name} r={int(model.rank)}"] = (a.double() @ b.double())[0].cpu()
    return out


def _figure(rows: Dict[str, torch.Tensor], titles: Sequence[str], path: str, cmap: str, suptitle: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = len(titles)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.7 * columns, 1.7 * len(rows) + 0.8), squeeze=False,
                             layout="constrained")
    stacked = torch.stack(list(rows.values()))  # [rows, columns, side, side]
    for c in range(columns):
        low, high = float(stacked[:, c].min()), float(stacked[:, c].max())
        for r, (label, maps) in enumerate(rows.items()):
            ax = axes[r][c]
            image = ax.imshow(maps[c].numpy(), cmap=cmap, vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
        fig.colorbar(image, ax=[axes[r][c] for r in range(len(rows))], location="bottom", shrink=0.9, aspect=12)
    fig.suptitle(suptitle, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def visualize(x: torch.Tensor, models: Dict[str, torch.nn.Module], rank: int, out_dir: str, image_idx: int,
              prefix: Optional[int] = None) -> Dict[str, str]:
    """Write image<K>_channels.png and image<K>_errors.png for sample x [N, D]; returns {kind: path}."""
    x = x.double()
    prefix = grid_prefix(x.shape[0]) if prefix is None else prefix
    channels = min(CHANNELS, x.shape[1])
    recon = reconstructions(x, models, rank)
    os.makedirs(out_dir, exist_ok=True)
    names = [f"ch {c}" for c in range(channels)]
    side = math.isqrt(x.shape[0] - prefix)
    paths = {"channels": os.path.join(out_dir, f"image{image_idx}_channels.png"),
             "errors": os.path.join(out_dir, f"image{image_idx}_errors.png")}
    rows = {"original": token_maps(x, prefix, channels),
            **{label: token_maps(x_hat, prefix, channels) for label, x_hat in recon.items()}}
    _figure(rows, names, paths["channels"], "viridis", f"sample {image_idx}: first {channels} channels on the "
            f"{side}x{side} token grid ({prefix} prefix dropped)")
    errors = {label: error_maps(x, x_hat, prefix, channels) for label, x_hat in recon.items()}
    _figure(errors, names + ["‖error‖ all D"], paths["errors"], "magma",
            f"sample {image_idx}: |original - reconstruction|")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Token-grid maps of one cached sample: original, SVD, learned")
    parser.add_argument("--features", required=True, help="feature cache directory")
    parser.add_argument("--image_idx", type=int, default=0, help="sample index in the cache")
    parser.add_argument("--results_dir", default="results", help="train_lowrank.py's results dir")
    parser.add_argument("--archs", nargs="*", default=list(DEFAULT_ARCHS), help="learned models to show")
    parser.add_argument("--rank", type=int, default=None, help="SVD rank (default: the first model's, else 16)")
    parser.add_argument("--prefix_tokens", type=int, default=None, help="tokens before the grid (default: found)")
    parser.add_argument("--out_dir", default=None, help="PNG folder (default RESULTS_DIR/visualize)")
    args = parser.parse_args(argv)

    def work():
        try:
            cache = FeatureCache(args.features)
        except ValueError as exc:
            raise UsageError(f"--features {exc}") from None
        if not 0 <= args.image_idx < len(cache):
            raise UsageError(f"--image_idx {args.image_idx}: the cache holds samples 0..{len(cache) - 1}")
        tokens, dim = cache.shape
        if args.prefix_tokens is not None and not 0 <= args.prefix_tokens < tokens:
            raise UsageError(f"--prefix_tokens {args.prefix_tokens}: must be between 0 and {tokens - 1}")
        models, notes = load_models(args.results_dir, args.archs, cache, "cpu")
        rank = args.rank if args.rank is not None else next((int(m.rank) for m in models.values()),
                                                            min(16, tokens, dim))
        if not 1 <= rank <= min(tokens, dim):
            raise UsageError(f"--rank {rank}: must be between 1 and min(N, D) = {min(tokens, dim)}")
        paths = visualize(cache[args.image_idx], models, rank, args.out_dir or os.path.join(args.results_dir,
                          "visualize"), args.image_idx, args.prefix_tokens)
        return paths, notes

    def report(done) -> None:
        paths, notes = done
        for note in notes:
            print(f"note: {note}")
        print(f"wrote {paths['channels']} and {paths['errors']}")

    return run_cli(work, report)
