"""Learned factorisations against truncated SVD, PCA and a random projection on cached features.

`evaluate(...)` is the whole comparison on tensors and modules; `main(argv)` is `compare_svd_nn.py`:
it reads the cache and the trained models, writes JSON + a markdown table, and exits 1 when a
learned model beats the per-sample SVD at its rank on any sample (Eckart–Young makes that
impossible, so it is a bug: in the model's rank, its factors or this comparison).
"""
import argparse
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from lowrank import baselines
from lowrank.cache import FeatureCache
from lowrank.train_cli import SPLIT_SEED, VAL_FRACTION  # the trainer's split: validate on its held-out samples
from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.errors import UsageError, error_line, run_cli

DEFAULT_RANKS = (16, 32, 64, 128)
DEFAULT_ARCHS = ("ResMLP", "MLP", "AdaLoRA")
# relative slack on the squared residual: A [N, r] @ B [r, D] in float64 has rank <= r up to rounding
RATIO_TOLERANCE = 1e-9


class RatioError(Exception):
    """A learned model's error is below the per-sample SVD's at the same rank (exit 1)."""


def batches(cache, indices: Sequence[int], size: int) -> Iterator[torch.Tensor]:
    """Samples `indices` of `cache` stacked as float32 [b, N, D] batches of at most `size`."""
    for begin in range(0, len(indices), size):
        yield torch.stack([cache[int(i)] for i in indices[begin:begin + size]])


def resolve_ranks(ranks: Optional[Sequence[int]], tokens: int, dim: int) -> List[int]:
    """The ranks to compare: `ranks` as given (UsageError above min(N, D) or below 1), else those of
    DEFAULT_RANKS that min(N, D) allows (min(N, D) itself when it is below all of them)."""
    limit = min(tokens, dim)
    if ranks:
        for rank in ranks:
            if not 1 <= rank <= limit:
                raise UsageError(f"--ranks {rank}: must be between 1 and min(N, D) = {limit} "
                                 f"(features [{tokens}, {dim}])")
        return sorted(set(ranks))
    return [r for r in DEFAULT_RANKS if r <= limit] or [limit]


def encode_flops(model: torch.nn.Module, tokens: int, dim: int) -> int:
    """FLOPs of one sample's forward (computing A and B), counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:  # not under no_grad: torch's module tracker then fails on outputs that are parameters
        model(torch.zeros(1, tokens, dim, device=next(model.parameters()).device))
    return int(counter.get_total_flops())


def _summary(values: torch.Tensor) -> Dict[str, float]:
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


class _Rows:
    """Per-sample metrics of every (rank, method), gathered batch by batch."""

    def __init__(self):
        self.parts: Dict[Tuple[int, str], Dict[str, List[torch.Tensor]]] = {}

    def add(self, rank: int, method: str, metrics: Dict[str, torch.Tensor]) -> None:
        store = self.parts.setdefault((rank, method), {})
        for key, value in metrics.items():
            store.setdefault(key, []).append(value.detach().cpu())

    def get(self, rank: int, method: str) -> Dict[str, torch.Tensor]:
        return {key: torch.cat(values) for key, values in self.parts[(rank, method)].items()}


def evaluate(val: Iterator[torch.Tensor], train: Iterator[torch.Tensor], tokens: int, dim: int,
             ranks: Sequence[int], models: Dict[str, torch.nn.Module], value_bytes: int = 2, seed: int = 0,
             device: str = "cpu") -> dict:
    """Compare every method on the validation batches `val` (each [b, N, D]); PCA is fitted on `train`.

    `models` maps a name to a module with forward(x [B, N, D]) -> (A [B, N, r'], B [B, r', D]) and an
    attribute `rank` (r'); each is compared with the SVD at its own rank r' (added to `ranks`).
    Returns {"shape", "ranks", "rows": [...], "ratios": {model: [per-sample ratio]}}; raises RatioError
    naming the first validation sample where a model's error is below the SVD's.
    """
    mean, basis, _ = baselines.fit_pca(b.to(device) for b in train)
    limit = min(tokens, dim)
    # a model of rank r' > min(N, D) is compared with the (exact) SVD at min(N, D)
    model_ranks = {name: min(int(model.rank), limit) for name, model in models.items()}
    all_ranks = sorted(set(ranks) | set(model_ranks.values()))
    projections = {rank: baselines.random_basis(dim, baselines.fair_pca_rank(rank, tokens, dim), seed).to(device)
                   for rank in all_ranks}
    rows, seen, ratios = _Rows(), 0, {}
    for batch in val:
        x = batch.to(device).double()
        u, s, vh = baselines.svd_factors(x)
        svd_residual = {}
        for rank in all_ranks:
            x_svd = torch.matmul(*baselines.truncate(u, s, vh, rank))
            metrics = baselines.reconstruction_metrics(x, x_svd)
            svd_residual[rank] = (x - x_svd).pow(2).sum((-2, -1))
            rows.add(rank, "svd", metrics)
            k = baselines.fair_pca_rank(rank, tokens, dim)
            rows.add(rank, "pca", baselines.reconstruction_metrics(x, baselines.pca_reconstruct(x, mean, basis, k)))
            projected = baselines.project_reconstruct(x, projections[rank])
            rows.add(rank, "random", baselines.reconstruction_metrics(x, projected))
        for name, model in models.items():
            with torch.no_grad():
                a, b = model(batch.to(device).float())
            x_hat = a.double() @ b.double()
            rank = model_ranks[name]
            rows.add(rank, name, baselines.reconstruction_metrics(x, x_hat))
            learned = (x - x_hat).pow(2).sum((-2, -1))
            optimal = svd_residual[rank]
            _check_ratio(name, rank, learned, optimal, seen)
            ratio = torch.where(optimal > 0, (learned / optimal.clamp_min(1e-300)).sqrt(),
                                torch.where(learned > 0, torch.inf, 1.0))
            ratios.setdefault(name, []).append(ratio.cpu())
        seen += x.shape[0]
    if seen == 0:
        raise UsageError("no validation samples to compare")
    return _report(rows, all_ranks, models, model_ranks, ratios, tokens, dim, value_bytes)


def _check_ratio(name: str, rank: int, learned: torch.Tensor, optimal: torch.Tensor, offset: int) -> None:
    below = learned < optimal * (1 - RATIO_TOLERANCE)
    if bool(below.any()):
        j = int(below.nonzero()[0])
        ratio = float((learned[j] / optimal[j]).sqrt())
        raise RatioError(f"{name} (rank {rank}): learned/SVD error ratio {ratio:.9f} < 1 on validation sample "
                         f"{offset + j}; a rank-{rank} factorisation cannot beat the truncated SVD (a bug)")


def _report(rows: _Rows, ranks, models, model_ranks, ratios, tokens: int, dim: int, value_bytes: int) -> dict:
    table = []
    for rank in ranks:
        svd = rows.get(rank, "svd")
        k = baselines.fair_pca_rank(rank, tokens, dim)
        methods = [("svd", rank, baselines.factor_values(rank, tokens, dim), baselines.svd_flops(tokens, dim)),
                   ("pca", k, tokens * k, baselines.projection_flops(tokens, dim, k)),
                   ("random", k, tokens * k, baselines.projection_flops(tokens, dim, k))]
        methods += [(name, rank, baselines.factor_values(rank, tokens, dim), encode_flops(models[name], tokens, dim))
                    for name in models if model_ranks[name] == rank]
        for method, kept, values, flops in methods:
            metrics = rows.get(rank, method)
            ratio = (metrics["rel_fro"] / svd["rel_fro"].clamp_min(1e-300))
            table.append({"rank": rank, "method": method, "kept_rank": kept, "bytes_per_sample": values * value_bytes,
                          "encode_flops": flops, **{key: _summary(value) for key, value in metrics.items()},
                          "ratio_vs_svd": _summary(ratio)})
    return {"shape": [tokens, dim], "ranks": list(ranks), "value_bytes": value_bytes, "rows": table,
            "ratios": {name: torch.cat(values).tolist() for name, values in ratios.items()}}


def to_markdown(result: dict) -> str:
    """The comparison as a markdown table (means over validation samples; ratio: mean and minimum)."""
    lines = [f"Features [{result['shape'][0]}, {result['shape'][1]}], {result['value_bytes']} bytes per value; "
             f"PCA and random keep k = floor(r (N + D) / N) components (same bytes per sample as rank r).", "",
             "| r | method | k | bytes/sample | encode MFLOPs | MSE | rel. Frobenius | cosine | energy "
             "| error / SVD (mean) | error / SVD (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['rank']} | {row['method']} | {row['kept_rank']} | {row['bytes_per_sample']} "
                     f"| {row['encode_flops'] / 1e6:.3f} | {row['mse']['mean']:.4g} | {row['rel_fro']['mean']:.4f} "
                     f"| {row['cosine']['mean']:.4f} | {row['energy']['mean']:.4f} "
                     f"| {row['ratio_vs_svd']['mean']:.4f} | {row['ratio_vs_svd']['min']:.4f} |")
    return "\n".join(lines + [""] + [f"- {note}" for note in result.get("notes", [])]) + "\n"


def load_models(results_dir: str, archs: Sequence[str], cache: FeatureCache, device: str):
    """({arch: model}, notes) of results_dir/<arch>/best_model.pt; an arch without a file, or trained on
    another encoder's features or shape, is skipped with a note."""
    from lowrank.models import load_trained
    models, notes = {}, []
    for arch in archs:
        path = os.path.join(results_dir, arch, "best_model.pt")
        if not os.path.isfile(path):
            notes.append(f"{arch}: skipped, no {path} (train it with train_lowrank.py --arch {arch})")
            continue
        model, meta = load_trained(path)
        if meta.get("encoder") != cache.encoder or (meta.get("num_tokens"), meta.get("dim")) != cache.shape:
            notes.append(f"{arch}: skipped, {path} was trained on {meta.get('encoder')} features "
                         f"[{meta.get('num_tokens')}, {meta.get('dim')}], the cache holds {cache.encoder} "
                         f"{list(cache.shape)}")
            continue
        models[arch] = model.to(device).eval()
    return models, notes


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, help="feature cache directory (extract_features.py --out)")
    parser.add_argument("--results_dir", default="results", help="train_lowrank.py's results dir")
    parser.add_argument("--archs", nargs="*", default=list(DEFAULT_ARCHS), help="learned models to compare")
    parser.add_argument("--ranks", type=int, nargs="*", help="ranks r (default 16 32 64 128 up to min(N, D))")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random projection's basis")
    parser.add_argument("--value_bytes", type=int, default=2, help="bytes per stored value (2: float16)")
    parser.add_argument("--batch_size", type=int, default=32, help="samples per evaluation batch")
    parser.add_argument("--device", default="cpu", help="torch device (cuda for big features)")
    parser.add_argument("--out", default=None, help="JSON path (default RESULTS_DIR/compare_svd_nn.json; "
                                                    "the markdown table goes next to it as .md)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry: 0 done (JSON and markdown written), 2 bad input, 1 a compression ratio out of reach."""
    args = parse_args(argv)
    return run_cli(lambda: compare(args), lambda result: write_result(result, args),
                   expected=[(RatioError, error_line(1))])


def compare(args: argparse.Namespace) -> dict:
    """The comparison's result for parsed flags; UsageError naming the flag for bad input."""
    for flag in ("batch_size", "value_bytes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    try:
        cache = FeatureCache(args.features)
    except ValueError as exc:
        raise UsageError(f"--features {exc}") from None
    try:
        train_idx, val_idx = FeatureCache.split_indices(len(cache), VAL_FRACTION, SPLIT_SEED)
    except ValueError as exc:
        raise UsageError(f"--features {args.features}: {exc}") from None
    tokens, dim = cache.shape
    ranks = resolve_ranks(args.ranks, tokens, dim)
    models, notes = load_models(args.results_dir, args.archs, cache, args.device)
    result = evaluate(batches(cache, val_idx.tolist(), args.batch_size),
                      batches(cache, train_idx.tolist(), args.batch_size), tokens, dim, ranks, models,
                      args.value_bytes, args.seed, args.device)
    result.update(features=args.features, encoder=cache.encoder, train_samples=len(train_idx),
                  val_samples=len(val_idx), notes=notes + _fair_rank_notes(ranks, tokens, dim))
    return result


def write_result(result: dict, args: argparse.Namespace) -> None:
    """`--out` (default RESULTS_DIR/compare_svd_nn.json) and the markdown table next to it, printed too."""
    out = args.out or os.path.join(args.results_dir, "compare_svd_nn.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_json(out, result, indent=1)
    markdown = to_markdown(result)
    atomic_write_text(os.path.splitext(out)[0] + ".md", markdown)
    print(markdown, end="")
    print(f"wrote {out} and {os.path.splitext(out)[0]}.md")


def _fair_rank_notes(ranks: Sequence[int], tokens: int, dim: int) -> List[str]:
    capped = [str(r) for r in ranks if baselines.fair_pca_rank(r, tokens, dim) == dim]
    notes = [f"at r = {', '.join(capped)} the fair PCA rank reaches D = {dim}: PCA and the random projection "
             f"keep every channel and are exact there"] if capped else []
    return notes + ["SVD bytes count A [N, r] and B [r, D]; PCA counts the coefficients [N, k] only "
                    "(its basis [D, k] and mean are shared by all samples)"]
