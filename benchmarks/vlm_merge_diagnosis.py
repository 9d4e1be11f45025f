"""Where the merge stage loses accuracy: untrained mergers against random dropping, at the same token count.

On a tiny LLaVA of train_tiny_llava.py and the first --limit CIFAR-10 VQA test questions, exact match of the
greedy answer (--max_new_tokens, cut at eos) when --centres of the N vision tokens enter the LLM, for:

- origin: all N tokens, the plain model;
- random drop: N - M uniformly random tokens per sample removed before the LLM (the same draws for both
  position modes), the rest unchanged; RoPE positions `original` (each token at its own) or `recount`;
- random drop at layer 0 with vlm.baselines.RandomDrop (hard mode, original positions: a cross-check of the
  row above with other draws);
- an untrained LearnableTokenMerger (seeded, eval mode: top-M scorer centres, τ = --temperature) for every
  assignment (`all`: every token soft-assigned, the seed's; `others`: centres keep their own token) and
  positions mode with the seed's dot-product similarity, and for both assignments with cosine similarity
  (original positions). All mergers share one seed, so their weights and centres are the same;
- the same untrained merger's centres kept unchanged, the other tokens dropped (no merge; original positions).

`own share` is the weight of a centre's own token in its merged feature, A_cj / Σ_i A_ij, averaged over
centres and samples (1 for random drop): how much of the token the LLM was trained on survives the merge;
`empty` the fraction of centres given a total weight Σ_i A_ij < 0.01, whose merged feature is about zero.

    OMP_NUM_THREADS=2 python -m benchmarks.vlm_merge_diagnosis --checkpoint runs/vlm_cifar/tiny_llava/tiny_llava.pt \\
        --cifar_vqa data --limit 200 --out benchmarks/results/vlm_merge_diagnosis_cpu.json
"""
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

from utils.cli import OneLineParser
from utils.errors import UsageError, run_cli


class RandomCentres(nn.Module):
    """A merger stand-in that keeps M uniformly random tokens per sample unchanged (centres ascending), with
    the merger's `positions` and `num_centres`, so vlm.pruned_forward drops the other N - M before the LLM
    and places the kept ones as a merger's centres. Draws from a CPU generator seeded with `seed`; `reset()`
    restarts it. forward(vision [B, N, D], ...) -> vlm.merger.MergeOutput (assignment: one-hot rows of the
    kept tokens, zero rows of the dropped ones)."""

    def __init__(self, num_centres: int, positions: str, seed: int = 0):
        super().__init__()
        self.num_centres, self.positions, self.seed = num_centres, positions, seed
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def forward(self, vision, temperature=1.0, question=None, question_mask=None):
        from vlm.merger import MergeOutput
        batch, tokens, _ = vision.shape
        draws = torch.rand(batch, tokens, generator=self.generator).to(vision.device)
        centres = draws.topk(self.num_centres, dim=-1).indices.sort(dim=-1).values  # [B, M]
        merged = vision.gather(1, centres[..., None].expand(-1, -1, vision.shape[-1]))
        assignment = torch.zeros(batch, tokens, self.num_centres, device=vision.device)
        assignment.scatter_(1, centres[:, None, :], 1.0)
        kept = torch.full((batch,), float(self.num_centres), device=vision.device)
        return MergeOutput(merged, assignment, centres, kept, self.num_centres)


class ScorerCentres(nn.Module):
    """A merger's centre choice without its merge: `merger`'s centres (its scorer's top M), their tokens
    unchanged, the other N - M dropped; `positions` and `num_centres` as the merger's. Separates the cost of
    which tokens an untrained scorer keeps from the cost of folding the others in."""

    def __init__(self, merger):
        super().__init__()
        self.merger, self.positions, self.num_centres = merger, merger.positions, merger.num_centres

    def forward(self, vision, temperature=1.0, question=None, question_mask=None):
        from vlm.merger import merge_features
        out = self.merger(vision, temperature, question, question_mask)
        assignment = torch.zeros_like(out.assignment).scatter_(1, out.centres[:, None, :], 1.0)
        merged = merge_features(assignment, vision).to(vision.dtype)
        return dataclasses.replace(out, merged=merged, assignment=assignment)


def centre_stats(merger, model, batches, temperature: float) -> dict:
    """{"own_share": mean over centres and samples of A_cj / Σ_i A_ij (the centre's own token's weight in
    merged j), "empty_centres": fraction of centres with mass Σ_i A_ij < 0.01 (merged to about zero)}."""
    from vlm.llava import image_features
    shares, masses = [], []
    with torch.no_grad():
        for batch in batches:
            out = merger(image_features(model, batch["pixel_values"]), temperature)
            own = out.assignment.gather(1, out.centres[:, None, :]).squeeze(1)  # [b, j] = A[b, c_j, j]
            masses.append(out.assignment.sum(dim=1))  # [B, M]
            shares.append(own / masses[-1].clamp_min(1e-6))
    if hasattr(merger, "reset"):
        merger.reset()
    return {"own_share": float(torch.cat(shares).mean()),
            "empty_centres": float((torch.cat(masses) < 0.01).float().mean())}


def rows_to_run(args, hidden: int, tokens: int):
    """(label, mode, decider, merger) per table row; every merger built from the same seed."""
    from vlm.baselines import RandomDrop
    from vlm.merger import ASSIGNMENTS, LearnableTokenMerger
    rows = [("all tokens (origin)", "origin", None, None)]
    for positions in ("original", "recount"):
        rows.append((f"random drop, {positions} positions", "hard", None,
                     RandomCentres(args.centres, positions, args.seed)))
    rows.append(("random drop at layer 0 (RandomDrop), original", "hard",
                 RandomDrop([0], args.centres, args.seed), None))
    mergers = [(assignment, positions, "dot") for assignment in ASSIGNMENTS for positions in ("recount", "original")]
    mergers += [(assignment, "original", "cosine") for assignment in ASSIGNMENTS]
    for assignment, positions, similarity in mergers:
        torch.manual_seed(args.seed)
        merger = LearnableTokenMerger(hidden, tokens, target_merge_tokens=args.centres, d_internal=args.d_internal,
                                      positions=positions, assignment=assignment, similarity=similarity).eval()
        rows.append((f"untrained merger, assignment {assignment}, {positions}, {similarity}", "hard", None, merger))
    rows.append(("untrained scorer's centres kept, rest dropped, original", "hard", None, ScorerCentres(merger)))
    return rows


def diagnose(args) -> dict:
    """The results dict: setup and one entry per row {label, exact_match, vqa_accuracy, own_share, seconds}."""
    from vlm.data import VQACollator, batch_to, cifar10_vqa_splits, vqa_loader
    from vlm.evaluate import mode_accuracy
    from vlm.llava import llava_parts, num_image_tokens
    from vlm.pretrain import load_tiny_llava
    model, tokenizer, _ = load_tiny_llava(args.checkpoint)
    tokens, size = num_image_tokens(model.config), model.config.vision_config.image_size
    if not 1 <= args.centres < tokens:
        raise UsageError(f"--centres {args.centres}: need 1 <= centres < {tokens} (the model's vision tokens)")
    samples = cifar10_vqa_splits(args.cifar_vqa, args.seed, train_images=1, val_images=0)[2][: args.limit]
    loader = vqa_loader(samples, VQACollator(tokenizer, tokens, size, with_answers=False), args.batch_size,
                        shuffle=False, seed=args.seed)
    batches = [batch_to(b, "cpu", torch.float32, image_size=size) for b in loader]
    rows = []
    for label, mode, decider, merger in rows_to_run(args, llava_parts(model).hidden_size, tokens):
        start = time.perf_counter()
        result = mode_accuracy(model, batches, tokenizer, mode, decider=decider, merger=merger,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        stats = centre_stats(merger, model, batches, args.temperature) if merger is not None else {}
        rows.append({"label": label, "exact_match": result["exact_match"], "vqa_accuracy": result["accuracy"],
                     "llm_vision_tokens": result["vision_tokens_per_layer"][0],
                     "own_share": stats.get("own_share"), "empty_centres": stats.get("empty_centres"),
                     "seconds": time.perf_counter() - start})
        print(f"{label}: {100 * result['exact_match']:.1f} %", file=sys.stderr, flush=True)
    setup = {"checkpoint": args.checkpoint, "samples": len(samples), "vision_tokens": tokens,
             "centres": args.centres, "temperature": args.temperature, "d_internal": args.d_internal,
             "seed": args.seed, "max_new_tokens": args.max_new_tokens, "torch": torch.__version__,
             "threads": torch.get_num_threads()}
    return {"setup": setup, "rows": rows}


def table(results: dict) -> str:
    """Plain-text table: label, exact match %, own share, empty centres %, seconds."""
    setup = results["setup"]
    lines = [f"{setup['centres']} of {setup['vision_tokens']} image tokens into the LLM, {setup['samples']} "
             f"questions, tau {setup['temperature']:g}",
             f"{'row':<56} {'exact match':>11} {'own share':>9} {'empty':>7} {'s':>6}"]
    for row in results["rows"]:
        share = "" if row["own_share"] is None else f"{row['own_share']:.3f}"
        empty = "" if row["empty_centres"] is None else f"{100 * row['empty_centres']:.1f}%"
        lines.append(f"{row['label']:<56} {100 * row['exact_match']:>10.1f}% {share:>9} {empty:>7} "
                     f"{row['seconds']:>6.0f}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]):
    p = OneLineParser(description="Untrained mergers vs random dropping at the same token count (issue 11).")
    p.add_argument("--checkpoint", required=True, help="tiny_llava.pt of train_tiny_llava.py")
    p.add_argument("--cifar_vqa", default="data", metavar="DIR", help="folder holding cifar-10-batches-py")
    p.add_argument("--limit", type=int, default=200, help="first N test questions")
    p.add_argument("--centres", type=int, default=432, help="image tokens into the LLM (merge centres M)")
    p.add_argument("--temperature", type=float, default=0.1, help="the merger's assignment τ")
    p.add_argument("--d_internal", type=int, default=128, help="width of the merger's projections")
    p.add_argument("--batch_size", type=int, default=20)
    p.add_argument("--max_new_tokens", type=int, default=2, help="greedy answer tokens (one word + eos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results JSON (written atomically)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    if not os.path.isdir(os.path.join(args.cifar_vqa, "cifar-10-batches-py")):
        raise UsageError(f"--cifar_vqa {args.cifar_vqa}: no cifar-10-batches-py folder in it")
    for flag in ("limit", "batch_size", "max_new_tokens", "d_internal"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if args.temperature <= 0:
        raise UsageError(f"--temperature {args.temperature}: must be positive")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UsageError(f"--out {args.out}: its folder does not exist")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    def work():
        args = parse_args(argv)
        results = diagnose(args)
        if args.out:
            from utils.checkpoint import atomic_write_json
            atomic_write_json(args.out, results, indent=2)
        return results, args.out

    def report(done) -> None:
        print(table(done[0]) + (f"\nwrote {done[1]}" if done[1] else ""))

    return run_cli(work, report)


if __name__ == "__main__":
    sys.exit(main())
