"""Prefill speed and KV cache of vision-token pruning on a LLaVA-1.5-7B-shaped model (issue 11 item 9).

Random weights, built directly on the device (no CPU init, no download): CLIP ViT-L/14-336 tower (576
tokens, 24 layers x 1024), 2-layer GELU projector, LLaMA 32 layers x 4096 (11008 MLP, 32 heads, vocab 32064);
bf16, SDPA attention. A batch of B prompts "bos + 576 image tokens + 40 question tokens" is prefilled with
the cache on (`pruned_forward(..., use_cache=True)`: vision tower, merger, pruner heads and decoder) in
`origin` and in `hard` mode at target equivalent token budgets T̄ = Σ_l n_l / L ≈ 192 / 128 / 64.

The merger and the cross-attention pruner heads have random weights, so their keep decisions would not hit a
chosen T̄: the benchmark keeps the top-k of each head's own keep logits, with k from
`keep_counts_for_budget` (same ratio at every pruning layer); the heads run exactly as in a real prefill.
With the default 288 centres and layers [10, 20, 31], T̄ cannot go below 288 * 10 / 32 = 90 (all tokens
dropped at layer 10), so T̄ = 64 is reached by settings with fewer centres (144) or an earlier first
pruning layer ([2, 10, 20]).

Per row: median prefill latency (CUDA events, warm-up excluded), KV-cache MB (the cache tensors), counted
FLOPs (FlopCounterMode), the FLOP ratio origin / hard, the speedup origin / hard, speedup / FLOP ratio
(target >= 0.8) and the merger + pruner-head time as % of the hard prefill (target <= 10 %; CUDA events
around the merger's forward and each decide call, so no extra synchronisation).

--graph adds, after every eager row (origin included), the same prefill with fixed keep counts recorded
in a CUDA graph and replayed (vlm/graphed_prefill.py; the logits of the last position only, for origin and
hard alike): `captured: true`, speedup against the captured origin; its merger + head time is that of a
graph of the merger and head calls alone, on the inputs one prefill gave them. On the CPU (--tiny) the same
rows run the static prefill uncaptured (`captured: false`, `prefill: "static"`).

    python -m benchmarks.vlm_speed --out benchmarks/results/vlm_speed_h200.json        # GPU, bf16, batch 1 and 8
    python -m benchmarks.vlm_speed --graph --out benchmarks/results/vlm_speed_graph_h200.json   # + captured rows
    python -m benchmarks.vlm_speed --tiny --graph --out /tmp/vlm_speed.json             # CPU smoke: tiny model
"""
import argparse
import sys
import time
from typing import List, Optional, Sequence

import torch

from benchmarks.output import save

try:
    from vlm.baselines import keep_counts_for_budget, top_k_keep
    from utils.timing import median_ms
    from tokens.graphed import capture
    from vlm.cost import count_flops, kv_cache_bytes
    from vlm.graphed_prefill import GraphedPrefill
    from vlm.layer_pruner import LayerSpecificPruner
    from vlm.llava import build_llava, llava_parts, tiny_llava_config
    from vlm.merger import LearnableTokenMerger
    from vlm.pruned_forward import equivalent_token_budget, pruned_forward, static_prefill
except ImportError:  # run as a file, the repository root is not on sys.path
    sys.exit("run from the repository root: python -m benchmarks.vlm_speed --out FILE [--tiny]")

QUESTION_TOKENS = 40
IMAGE_TOKEN_ID = 32000
# (name, merge centres or None, pruning layers, target T̄ values)
SETTINGS = [("merge288_prune10-20-31", 288, (10, 20, 31), (192, 128)),
            ("merge144_prune10-20-31", 144, (10, 20, 31), (128, 64)),
            ("merge288_prune2-10-20", 288, (2, 10, 20), (192, 128, 64))]


def llava_7b_config():
    """LLaVA-1.5-7B shapes: CLIP ViT-L/14 at 336 px (576 patch tokens) -> projector -> LLaMA-2-7B decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       pad_token_id=0, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=0)


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    """The model on `device` in `dtype`, parameters created there (no CPU round trip) and re-drawn N(0, 0.02)."""
    config = tiny_llava_config(40, 3, 0) if tiny else llava_7b_config()
    with torch.device(device):
        model = build_llava(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device)                                              # no-op when built there
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.02)
    return model.eval()


def prompt_batch(model, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """bos + 576 image ids + 40 question ids per sample (no padding), random pixels."""
    config = model.config
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    question = torch.randint(5, config.text_config.vocab_size, (batch_size, QUESTION_TOKENS), generator=generator)
    question[question == config.image_token_id] = 4                      # text only: no extra image placeholder
    ids = torch.cat([torch.ones(batch_size, 1, dtype=torch.long),
                     torch.full((batch_size, tokens), config.image_token_id), question], dim=1)
    pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


class TopKPruner:
    """Keep decider that runs a LayerSpecificPruner's head at each layer and keeps the top `keep_tokens[layer]`
    of its keep logits (a chosen T̄ with random-weight heads). Times merger + decide with `timer`."""

    def __init__(self, pruner: LayerSpecificPruner, keep_tokens: Sequence[int], timer: "Timer"):
        self.pruner, self.layers, self.timer = pruner, pruner.layers, timer
        self.keep_tokens = dict(zip(pruner.layers, keep_tokens))
        self.calls = None  # a list: record each decide call's arguments

    def static_keep_count(self, layer: int, num_tokens: int) -> int:
        return min(self.keep_tokens[layer], num_tokens)

    def decide(self, layer, hidden, vision_index, vision_valid, question_hidden, question_mask, training=False,
               temperature=1.0):
        if self.calls is not None:
            self.calls.append((self.decide, (layer, hidden, vision_index, vision_valid, question_hidden,
                                             question_mask), {}))
        self.timer.start()
        logits = self.pruner.keep_logits(layer, hidden, vision_index, vision_valid, question_hidden, question_mask)
        keep = top_k_keep(logits, vision_valid, self.keep_tokens[layer]).to(hidden.dtype)
        self.timer.stop()
        return keep


class Timer:
    """Sums the time between start/stop pairs: CUDA events (read after the prefill, no extra sync) on a GPU,
    perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda, self.pairs, self.seconds, self.enabled = device.type == "cuda", [], 0.0, True

    def start(self):
        if not self.enabled:  # off while a prefill is captured or timed as a whole
            return
        if self.cuda:
            self.pairs.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.pairs[-1][0].record()
        else:
            self._begin = time.perf_counter()

    def stop(self):
        if not self.enabled:
            return
        if self.cuda:
            self.pairs[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self._begin

    def reset(self):
        self.pairs, self.seconds = [], 0.0

    def total_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.pairs)
        return self.seconds * 1e3


def measure(model, batch: dict, mode: str, decider, merger, timer: Timer, warmup: int, iters: int) -> dict:
    """Latency (median ms), KV MB, FLOPs, T̄ and merger + pruner ms (median) of one prefill configuration."""
    device = batch["input_ids"].device

    def prefill():
        return pruned_forward(model, batch, mode, decider=decider, merger=merger, use_cache=True)

    with torch.no_grad():
        output = prefill()
    overheads = []
    for _ in range(iters if merger is not None or decider is not None else 0):
        timer.reset()
        with torch.no_grad():
            prefill()
        overheads.append(timer.total_ms())
    return {"latency_ms": median_ms(prefill, device, warmup, iters),
            "kv_cache_mb": kv_cache_bytes(output.past_key_values) / 2 ** 20,
            "flops": count_flops(prefill),
            "equivalent_token_budget": equivalent_token_budget(output.vision_tokens_per_layer),
            "overhead_ms": sorted(overheads)[len(overheads) // 2] if overheads else 0.0}


def module_calls(model, batch: dict, plan, decider, merger) -> list:
    """(fn, args, kwargs) of the merger forward and each decide call of one static prefill (their real inputs)."""
    calls = []
    handle = merger.register_forward_pre_hook(lambda module, args, kwargs: calls.append((module, args, kwargs)),
                                              with_kwargs=True) if merger is not None else None
    if decider is not None:
        decider.calls = calls
    try:
        with torch.no_grad():
            static_prefill(model, batch, plan, decider, merger, use_cache=True, last_only=True)
    finally:
        if handle is not None:
            handle.remove()
        if decider is not None:
            decider.calls = None
    return calls


def measure_static(model, batch: dict, decider, merger, timer: Timer, warmup: int, iters: int) -> dict:
    """`measure`'s numbers for the fixed-count prefill captured in a CUDA graph (uncaptured on the CPU); merger
    + heads ms: a graph of their calls alone, on the inputs one prefill gave them (replay time, median)."""
    device = batch["input_ids"].device
    graph = device.type == "cuda"
    timer.enabled = False
    try:
        prefill = GraphedPrefill(model, batch, merger, decider, warmup=max(1, warmup), capture=graph)
        _, cache = prefill(batch)
        result = {"latency_ms": median_ms(lambda: prefill(batch), device, warmup, iters),
                  "kv_cache_mb": kv_cache_bytes(cache) / 2 ** 20,
                  "flops": count_flops(lambda: prefill._prefill(batch)),
                  "equivalent_token_budget": equivalent_token_budget(prefill.vision_tokens_per_layer),
                  "overhead_ms": 0.0, "captured": graph, "prefill": "graph" if graph else "static"}
        plan = prefill.plan
        prefill = cache = None  # frees the graph's memory pool
        calls = module_calls(model, batch, plan, decider, merger) if merger is not None or decider is not None else []
        if calls:
            def modules():
                with torch.no_grad():
                    return [fn(*args, **kwargs) for fn, args, kwargs in calls]
            replay = modules
            if graph:
                modules_graph, modules_output = capture(modules, device)  # the outputs live as long as the graph
                replay = modules_graph.replay
            result["overhead_ms"] = median_ms(replay, device, warmup, iters)
    finally:
        timer.enabled = True
        if graph:
            torch.cuda.empty_cache()
    return result


def compared(origin: dict, hard: dict) -> dict:
    """`hard` with the ratios against `origin` (measured the same way: both eager or both static/captured)."""
    flop_ratio, speedup = origin["flops"] / hard["flops"], origin["latency_ms"] / hard["latency_ms"]
    return {**hard, "flop_ratio": flop_ratio, "speedup": speedup, "speedup_over_flop_ratio": speedup / flop_ratio,
            "overhead_pct": 100.0 * hard["overhead_ms"] / hard["latency_ms"]}


def run(tiny: bool, batch_sizes: Sequence[int], warmup: int, iters: int, graph: bool = False,
        settings: Optional[Sequence[str]] = None) -> dict:
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    model = build(tiny, device, dtype)
    parts = llava_parts(model)
    d_internal = 32 if tiny else 512
    timer = Timer(device)
    rows = []
    for batch_size in batch_sizes:
        batch = prompt_batch(model, batch_size, device, dtype)
        eager = {"captured": False, "prefill": "eager"}
        origin = {**measure(model, batch, "origin", None, None, timer, warmup, iters), **eager}
        rows.append({"batch_size": batch_size, "setting": "origin", "target_budget": 576, **origin})
        if graph:
            static_origin = measure_static(model, batch, None, None, timer, warmup, iters)
            rows.append({"batch_size": batch_size, "setting": "origin", "target_budget": 576, **static_origin})
        for name, centres, layers, targets in SETTINGS:
            if settings is not None and name not in settings:
                continue
            with torch.device(device):
                merger = LearnableTokenMerger(parts.hidden_size, 576, target_merge_tokens=centres,
                                              d_internal=d_internal).to(dtype).eval()
                pruner = LayerSpecificPruner(parts.hidden_size, parts.num_layers, layers,
                                             d_internal=d_internal).to(dtype).eval()
            merger.register_forward_pre_hook(lambda *_: timer.start())
            merger.register_forward_hook(lambda *_: timer.stop())
            for target in targets:
                decider = TopKPruner(pruner, keep_counts_for_budget(target, centres, layers, parts.num_layers), timer)
                setting = {"batch_size": batch_size, "setting": name, "merge_centres": centres,
                           "pruning_layers": list(layers), "keep_tokens": list(decider.keep_tokens.values()),
                           "target_budget": target}
                hard = {**measure(model, batch, "hard", decider, merger, timer, warmup, iters), **eager}
                rows.append({**setting, **compared(origin, hard)})
                if graph:
                    hard = measure_static(model, batch, decider, merger, timer, warmup, iters)
                    rows.append({**setting, **compared(static_origin, hard)})
        del batch
    return {**setup(tiny, device, dtype), "warmup": warmup, "iters": iters, "graph": graph,
            "targets": {"speedup_over_flop_ratio": ">= 0.8", "overhead_pct": "<= 10"},
            "note": "288 centres with layers [10, 20, 31] cannot go below T̄ = 288 * 10 / 32 = 90; "
                    "T̄ 64 rows use 144 centres or layers [2, 10, 20]",
            "rows": rows}


def setup(tiny: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """The results' header shared by this benchmark and benchmarks/vlm_token_scaling.py: device, model, dtype,
    attention, question tokens, torch and transformers versions."""
    import transformers
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": "tiny LLaVA (32 layers at width 32, 576 vision tokens)" if tiny
            else "LLaVA-1.5-7B shapes, random weights",
            "dtype": str(dtype).replace("torch.", ""), "attention": "sdpa", "question_tokens": QUESTION_TOKENS,
            "torch": torch.__version__, "transformers": transformers.__version__}


def print_table(results: dict) -> None:
    print(f"{results['model']} on {results['device']} ({results['dtype']}, {results['attention']})")
    print(f"{'B':>2} {'setting':<24} {'run':<6} {'T̄ tgt':>6} {'T̄':>6} {'ms':>9} {'KV MB':>9} {'GFLOP':>9} "
          f"{'FLOPx':>6} {'speedx':>6} {'eff':>5} {'ovh%':>5}")
    for r in results["rows"]:
        extra = (f"{r['flop_ratio']:6.2f} {r['speedup']:6.2f} {r['speedup_over_flop_ratio']:5.2f} "
                 f"{r['overhead_pct']:5.1f}" if "speedup" in r else "")
        print(f"{r['batch_size']:>2} {r['setting']:<24} {r['prefill']:<6} {r['target_budget']:>6} "
              f"{r['equivalent_token_budget']:6.1f} {r['latency_ms']:9.2f} {r['kv_cache_mb']:9.1f} "
              f"{r['flops'] / 1e9:9.1f} {extra}")
    print(f"FLOPx = origin / hard FLOPs, speedx = origin / hard prefill ms, eff = speedx / FLOPx (target >= 0.8), "
          f"ovh% = merger + pruner heads / hard prefill (target <= 10); run: eager, static (fixed counts, "
          f"uncaptured) or graph (fixed counts, CUDA graph replay; ratios against the origin run the same way)."
          f"\nNote: {results['note']}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU in fp32 (smoke test)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=None, help="default 1 8 (tiny: 1 2)")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (tiny: 1)")
    p.add_argument("--iters", type=int, default=None, help="default 10 (tiny: 1)")
    p.add_argument("--graph", action="store_true",
                   help="also measure every row (origin too) with fixed keep counts captured in a CUDA graph "
                        "(on the CPU: the same static prefill, uncaptured)")
    p.add_argument("--settings", nargs="+", choices=[name for name, *_ in SETTINGS], default=None,
                   help="pruned settings to run (default: all)")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device (use --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    results = run(args.tiny, args.batch_sizes or ([1, 2] if args.tiny else [1, 8]),
                  args.warmup if args.warmup is not None else (1 if args.tiny else 3),
                  args.iters if args.iters is not None else (1 if args.tiny else 10), args.graph,
                  args.settings)
    print_table(results)
    return save(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
