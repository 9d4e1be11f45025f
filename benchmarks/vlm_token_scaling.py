"""How prefill time scales with the number of vision tokens the decoder runs: the ceiling of any token pruning.

The pruned prefill of benchmarks/vlm_speed.py still runs the whole vision tower (576 tokens) and the decoder
over the question; only the decoder's vision tokens shrink. This benchmark times those parts alone on the same
LLaVA-1.5-7B-shaped model (random weights, bf16, SDPA), each captured in a CUDA graph and replayed (so no
host overhead): the vision tower + projector on one image per sample, and the decoder (32 layers, final norm,
LM head on the last position) over 1 + T vision + 40 question tokens for T in --tokens. A method that keeps T
vision tokens in every layer cannot prefill faster than tower + decoder(T), so

    ceiling speedup(T) = (tower + decoder(576)) / (tower + decoder(T))

bounds the speedup of every token-reduction method at equivalent budget T̄ = T, whatever its FLOP ratio; the
FLOP ratio assumes time proportional to FLOPs, which a decoder at batch 1 with a few hundred tokens (matrix
products of a few hundred rows against 4096-wide weights) does not reach.

    python -m benchmarks.vlm_token_scaling --out benchmarks/results/vlm_token_scaling_h100.json    # GPU
    python -m benchmarks.vlm_token_scaling --tiny --out /tmp/scaling.json                          # CPU smoke

The CPU smoke run times the tiny model eagerly; there the time grows faster than the FLOPs (ceiling / FLOP
ratio above 1), which says nothing about a GPU: only GPU numbers bound a GPU prefill.
"""
import argparse
import sys
from typing import List, Optional, Sequence

import torch

from benchmarks.output import save
from benchmarks.vlm_speed import QUESTION_TOKENS, build, prompt_batch, setup
from tokens.graphed import capture
from utils.timing import median_ms
from vlm.cost import count_flops
from vlm.llava import image_features, llava_parts

TOKENS = (0, 64, 128, 192, 288, 576)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median ms of fn(): replayed from a CUDA graph on a GPU, called eagerly on the CPU."""
    with torch.no_grad():
        if device.type == "cuda":
            graph, _ = capture(fn, device)
            try:
                return median_ms(graph.replay, device, warmup, iters)
            finally:
                del graph
                torch.cuda.empty_cache()
        return median_ms(fn, device, warmup, iters)


def measure(model, batch_size: int, tokens: Sequence[int], warmup: int, iters: int) -> List[dict]:
    """Rows {batch_size, part, vision_tokens, sequence, latency_ms, flops} for the tower and each T."""
    parts = llava_parts(model)
    device, dtype = model.device, model.dtype
    pixels = prompt_batch(model, batch_size, device, dtype)["pixel_values"]
    tower = lambda: image_features(model, pixels)  # noqa: E731
    rows = [{"batch_size": batch_size, "part": "vision tower + projector", "vision_tokens": None,
             "latency_ms": timed(tower, device, warmup, iters), "flops": count_flops(tower)}]
    generator = torch.Generator(device=device).manual_seed(0)
    for count in tokens:
        length = 1 + count + QUESTION_TOKENS
        embeds = torch.randn(batch_size, length, parts.hidden_size, device=device, dtype=dtype, generator=generator)

        def decoder():
            hidden = parts.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            return parts.lm_head(hidden[:, -1:])
        rows.append({"batch_size": batch_size, "part": "decoder", "vision_tokens": count, "sequence": length,
                     "latency_ms": timed(decoder, device, warmup, iters), "flops": count_flops(decoder)})
    return rows


def ceilings(rows: List[dict]) -> List[dict]:
    """Per batch size and T: tower + decoder(T) ms, and the ceiling speedup and FLOP ratio against T = max."""
    out = []
    for batch_size in sorted({r["batch_size"] for r in rows}):
        own = [r for r in rows if r["batch_size"] == batch_size]
        tower = next(r for r in own if r["vision_tokens"] is None)
        decoders = sorted((r for r in own if r["vision_tokens"] is not None), key=lambda r: r["vision_tokens"])
        full = decoders[-1]
        full_ms, full_flops = tower["latency_ms"] + full["latency_ms"], tower["flops"] + full["flops"]
        for r in decoders:
            ms, flops = tower["latency_ms"] + r["latency_ms"], tower["flops"] + r["flops"]
            out.append({"batch_size": batch_size, "vision_tokens": r["vision_tokens"], "prefill_floor_ms": ms,
                        "ceiling_speedup": full_ms / ms, "flop_ratio": full_flops / flops,
                        "ceiling_over_flop_ratio": (full_ms / ms) / (full_flops / flops)})
    return out


def print_table(results: dict) -> None:
    run = "captured" if results["device"] != "cpu" else "eager: the CPU smoke run, not the GPU's ceiling"
    print(f"{results['model']} on {results['device']} ({results['dtype']}, {results['attention']}, {run})")
    print(f"{'B':>2} {'part':<26} {'T':>4} {'ms':>8} {'GFLOP':>9}")
    for r in results["rows"]:
        count = "" if r["vision_tokens"] is None else r["vision_tokens"]
        print(f"{r['batch_size']:>2} {r['part']:<26} {count:>4} {r['latency_ms']:8.2f} {r['flops'] / 1e9:9.3g}")
    print(f"{'B':>2} {'T':>4} {'floor ms':>9} {'ceiling x':>9} {'FLOP x':>7} {'ceiling/FLOP':>12}")
    for c in results["ceilings"]:
        print(f"{c['batch_size']:>2} {c['vision_tokens']:>4} {c['prefill_floor_ms']:9.2f} {c['ceiling_speedup']:9.2f} "
              f"{c['flop_ratio']:7.2f} {c['ceiling_over_flop_ratio']:12.2f}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU in fp32 (smoke test)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="vision tokens in the decoder")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device (use --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    if any(t < 0 for t in args.tokens) or any(b < 1 for b in args.batch_sizes):
        print("error: --tokens must be >= 0 and --batch_sizes >= 1", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.tiny else "cuda")
    model = build(args.tiny, device, torch.float32 if args.tiny else torch.bfloat16)
    rows = [row for batch_size in args.batch_sizes
            for row in measure(model, batch_size, sorted(set(args.tokens)), args.warmup, args.iters)]
    results = {**setup(args.tiny, device, model.dtype), "warmup": args.warmup, "iters": args.iters, "rows": rows,
               "ceilings": ceilings(rows)}
    print_table(results)
    return save(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
