"""Origin / soft / hard evaluation of a vision-token pruned LLaVA, and of baselines at the same token budget
(issue 11 items 5 and 6).

Per mode: VQA soft accuracy and exact match of greedy answers (`generate_counted`, scored by vlm.data's
metrics), the mean vision tokens entering each decoder layer over the evaluated samples and the equivalent
token budget T̄ = Σ_l n_l / L (from `pruned_forward`'s `vision_tokens_per_layer` on each prompt batch), and
on the first batch: counted FLOPs of the prefill, its measured latency (median, warm-up excluded) and the
bytes of the KV cache it leaves. The prefill is the whole `pruned_forward(..., use_cache=True)`: vision
tower, merger, pruner heads and the decoder.
"""
import unicodedata
from typing import Dict, List, Optional, Sequence

import torch

from utils.errors import UsageError
from utils.timing import median_ms
from vlm.baselines import FastVDrop, RandomDrop, keep_counts_for_budget
from vlm.cost import count_flops, kv_cache_bytes
from vlm.data import batch_to, exact_match, vqa_accuracy, vqa_loader
from vlm.pruned_forward import equivalent_token_budget, generate_counted, pruned_forward
from vlm.tokenizer import WordTokenizer

MODES = ("origin", "soft", "hard")
ACCURACY_KEYS = {"origin": "accuracy_baseline", "soft": "accuracy_soft", "hard": "accuracy_hard"}
BASELINES = ("random", "fastv")


def decode_answers(tokenizer, generated: torch.Tensor) -> List[str]:
    """Text of each row of generated ids [B, T] (new tokens only), cut at the first eos (pruned_generate does
    not stop early): a `vlm.tokenizer.WordTokenizer` decodes words; a Hugging Face tokenizer skips special
    tokens and strips spaces."""
    eos = getattr(tokenizer, "eos_token_id", None)
    texts = []
    for row in generated.tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row) if isinstance(tokenizer, WordTokenizer)
                     else tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def _new_tokens(generated: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The generated ids after the prompt, whether `generated` repeats the prompt or not."""
    prompt = input_ids.shape[1]
    if generated.shape[1] > prompt and torch.equal(generated[:, :prompt].to(input_ids.device), input_ids):
        return generated[:, prompt:]
    return generated


def _reset(decider) -> None:
    """Restart a seeded decider (RandomDrop) so every mode sees the same draws on the same batches."""
    if hasattr(decider, "reset"):
        decider.reset()


def mode_accuracy(model, batches: Sequence[dict], tokenizer, mode: str, decider=None, merger=None,
                  max_new_tokens: int = 8, temperature: float = 1.0, bar=None) -> dict:
    """VQA soft accuracy, exact match (means over samples) and vision tokens per layer (mean over samples)
    of `mode` on prompt-only batches (VQACollator(with_answers=False), already on the model's device);
    `bar` (a tqdm bar, or None) advances by one per batch."""
    accuracy = exact = 0.0
    samples, per_layer = 0, None
    _reset(decider)
    with torch.no_grad():
        for batch in batches:
            size = batch["input_ids"].shape[0]
            generated, counts = generate_counted(model, batch, mode, decider=decider, merger=merger,
                                                 max_new_tokens=max_new_tokens, temperature=temperature)
            answers = decode_answers(tokenizer, _new_tokens(generated, batch["input_ids"]))
            accuracy += sum(vqa_accuracy(a, refs) for a, refs in zip(answers, batch["answers"]))
            exact += sum(exact_match(a, refs) for a, refs in zip(answers, batch["answers"]))
            weighted = [float(c) * size for c in counts]
            per_layer = weighted if per_layer is None else [p + w for p, w in zip(per_layer, weighted)]
            samples += size
            if bar is not None:
                bar.update(1)
    return {"accuracy": accuracy / samples, "exact_match": exact / samples,
            "vision_tokens_per_layer": [p / samples for p in per_layer]}


def prefill_cost(model, batch: dict, mode: str, decider=None, merger=None, warmup: int = 1,
                 iters: int = 3, temperature: float = 1.0) -> dict:
    """Counted FLOPs, median prefill milliseconds and KV-cache bytes of one `pruned_forward` with the cache on."""

    def prefill():
        _reset(decider)
        return pruned_forward(model, batch, mode, decider=decider, merger=merger, use_cache=True,
                              temperature=temperature)

    outputs = []
    flops = count_flops(lambda: outputs.append(prefill()))
    device = batch["input_ids"].device
    return {"flops": flops, "prefill_latency_ms": median_ms(prefill, device, warmup, iters),
            "kv_cache_bytes": kv_cache_bytes(outputs[0].past_key_values)}


def tokens_per_stage(vision_tokens: float, per_layer: Sequence[float], pruning_layers: Sequence[int]) -> dict:
    """Mean vision tokens per sample at each stage: out of the vision tower, into the LLM (after merging),
    into each pruning layer, and into the last layer."""
    stages = {"vision_tower": vision_tokens, "llm_input": per_layer[0]}
    stages.update({f"layer_{layer}": per_layer[layer] for layer in pruning_layers})
    stages["last_layer"] = per_layer[-1]
    return stages


def run_modes(model, batches, tokenizer, modes, decider, merger, pruning_layers, max_new_tokens, warmup,
              iters, temperature: float = 1.0, bar=None, label: str = "") -> Dict[str, dict]:
    """mode -> {accuracy, exact_match, vision_tokens_per_layer, equivalent_token_budget, tokens_per_stage,
    flops, prefill_latency_ms, kv_cache_bytes} for each of `modes`. `temperature`: the merger's assignment
    temperature (the one training ended at; the keep decisions at eval do not depend on it). `bar`: a tqdm bar
    advanced per batch, its description set to `label` + the mode."""
    image_token_id = model.config.image_token_id
    vision_tokens = float((batches[0]["input_ids"] == image_token_id).sum(1).float().mean())
    results = {}
    for mode in modes:
        learned = {} if mode == "origin" else {"decider": decider, "merger": merger, "temperature": temperature}
        if bar is not None:
            bar.set_description(f"{label}{mode}")
        result = mode_accuracy(model, batches, tokenizer, mode, max_new_tokens=max_new_tokens, bar=bar, **learned)
        result["equivalent_token_budget"] = equivalent_token_budget(result["vision_tokens_per_layer"])
        result["tokens_per_stage"] = tokens_per_stage(vision_tokens, result["vision_tokens_per_layer"],
                                                      pruning_layers)
        result.update(prefill_cost(model, batches[0], mode, warmup=warmup, iters=iters, **learned))
        results[mode] = result
    return results


def baseline_decider(name: str, model, target_budget: float, num_tokens: int, layers: Sequence[int], seed: int):
    """A RandomDrop or FastVDrop decider whose keep counts give `target_budget` (see keep_counts_for_budget;
    FastV uses only the first of `layers`). Raises ValueError for an unknown name or unreachable budget."""
    num_layers = len(model.model.language_model.layers)
    if name == "random":
        return RandomDrop(layers, keep_counts_for_budget(target_budget, num_tokens, layers, num_layers), seed)
    if name == "fastv":
        keep = keep_counts_for_budget(target_budget, num_tokens, layers[:1], num_layers)[0]
        return FastVDrop(layer=layers[0], keep_tokens=keep, model=model)
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


def evaluate(model, batches: Sequence[dict], tokenizer, modes: Sequence[str], decider=None, merger=None,
             pruning_layers: Sequence[int] = (), baselines: Sequence[str] = (),
             budgets: Optional[Sequence[float]] = None, baseline_layers: Sequence[int] = (2,), seed: int = 0,
             max_new_tokens: int = 8, warmup: int = 1, iters: int = 3, temperature: float = 1.0,
             progress: bool = False) -> dict:
    """The results JSON (docs/vlm_eval.md lists the keys) of `modes` for the learned merger + decider, then of
    each baseline (no merger; pruned modes of `modes` only) at every target T̄ in `budgets` (vision tokens);
    `budgets=None` takes the T̄ the learned method reached in hard mode (else soft). `progress`: a tqdm bar on
    stderr over (modes + baselines x budgets x pruned modes) x batches."""
    from tqdm import tqdm
    baseline_modes = [m for m in modes if m != "origin"]
    runs = len(budgets) if budgets is not None else int(bool(set(modes) & {"soft", "hard"}))
    total = len(batches) * (len(modes) + len(baselines) * runs * len(baseline_modes))
    with tqdm(total=total, unit="batch", disable=not progress) as bar:
        return _evaluate(model, batches, tokenizer, modes, decider, merger, pruning_layers, baselines, budgets,
                         baseline_layers, seed, max_new_tokens, warmup, iters, temperature, bar)


def _evaluate(model, batches, tokenizer, modes, decider, merger, pruning_layers, baselines, budgets,
              baseline_layers, seed, max_new_tokens, warmup, iters, temperature, bar) -> dict:
    per_mode = run_modes(model, batches, tokenizer, modes, decider, merger, pruning_layers, max_new_tokens,
                         warmup, iters, temperature, bar)
    vision_tokens = int((batches[0]["input_ids"][0] == model.config.image_token_id).sum())
    results = {key: per_mode[mode]["accuracy"] if mode in per_mode else None for mode, key in ACCURACY_KEYS.items()}
    results["exact_match"] = {mode: r["exact_match"] for mode, r in per_mode.items()}
    pruned = [m for m in ("hard", "soft") if m in per_mode]
    results["keep_ratio_merge"] = per_mode[pruned[0]]["vision_tokens_per_layer"][0] / vision_tokens if pruned else None
    for key in ("tokens_per_stage", "vision_tokens_per_layer", "equivalent_token_budget", "flops",
                "prefill_latency_ms", "kv_cache_bytes"):
        results[key] = {mode: r[key] for mode, r in per_mode.items()}
    if budgets is None:
        budgets = [per_mode[pruned[0]]["equivalent_token_budget"]] if pruned else []
    results["baselines"] = []
    baseline_modes = [m for m in modes if m != "origin"]
    for name in baselines:
        for budget in budgets:
            try:
                baseline = baseline_decider(name, model, budget, vision_tokens, baseline_layers, seed)
            except ValueError as exc:  # e.g. a learned T̄ below what dropping at the baseline's layer reaches
                results["baselines"].append({"name": name, "target_budget": budget, "skipped": str(exc)})
                bar.update(len(batches) * len(baseline_modes))
                continue
            runs = run_modes(model, batches, tokenizer, baseline_modes, baseline, None, baseline.layers,
                             max_new_tokens, warmup, iters, bar=bar, label=f"{name} T̄={budget:.4g} ")
            entry = {"name": name, "target_budget": budget, "layers": list(baseline.layers),
                     "keep_tokens": [baseline.keep_tokens[layer] for layer in baseline.layers]}
            entry.update({ACCURACY_KEYS[m]: r["accuracy"] for m, r in runs.items()})
            for key in ("exact_match", "equivalent_token_budget", "flops", "prefill_latency_ms", "kv_cache_bytes"):
                entry[key] = {mode: r[key] for mode, r in runs.items()}
            results["baselines"].append(entry)
    return results


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; UsageError naming --device for an unavailable CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (auto, cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here")
    return device


def load_eval_setup(checkpoint: Optional[str], seed: int):
    """(backbone, merger, decider, pruning_layers, temperature) of a train_vlm_pruning.py checkpoint (the
    temperature its training had reached, saved with it; temperature_min for checkpoints without it), or with None of
    `--tiny_random`: the training defaults on the tests' tiny random LLaVA (576 vision tokens, 32 layers at
    width 32, CIFAR-10 VQA vocabulary) with an untrained merger (288 centres) and cross-attention pruner at
    [10, 20, 31] (heads of width 32), random weights from `seed`. backbone: vlm.checkpoints.Backbone (model,
    tokenizer, prompt collate). CheckpointError (one line naming the file) for a foreign or mismatched checkpoint."""
    from vlm.checkpoints import build_modules, load_backbone, load_trained
    from vlm.config import VLMPruningConfig, validate
    if checkpoint is not None:
        return load_trained(checkpoint)
    # heads as wide as the tiny LLM (the training default 512 would dwarf its FLOPs)
    config = validate(VLMPruningConfig(tiny_random=True, seed=seed, pruner_d_internal=32))
    backbone = load_backbone(config)
    modules = build_modules(config, backbone)
    return (backbone, modules["merger"].eval(), modules["pruner"].eval(), tuple(config.pruning_layers),
            config.temperature)


def eval_samples(args, seed: int):
    """The first `args.limit` VQA samples of --data (JSONL), --cifar_vqa (the generated CIFAR-10 VQA test
    set) or, with neither, of a generated set on random images (so --tiny_random runs anywhere)."""
    from vlm.data import cifar10_vqa, cifar10_vqa_splits, read_vqa_jsonl
    if args.data:
        return read_vqa_jsonl(args.data)[: args.limit]
    if args.cifar_vqa:
        return cifar10_vqa_splits(args.cifar_vqa, seed, train_images=1, val_images=0)[2][: args.limit]
    generator = torch.Generator().manual_seed(seed)
    count = (args.limit + 1) // 2
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return cifar10_vqa(images, torch.randint(0, 10, (count,), generator=generator), seed)[: args.limit]


def evaluate_from_args(args) -> dict:
    """Load model, merger, decider and samples named by the flags of eval_vlm_pruning.py, run `evaluate`,
    and return its results with a `setup` section. UsageError (naming the flag or file) before any work."""
    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    backbone, merger, decider, layers, temperature = load_eval_setup(args.checkpoint, args.seed)
    model, merger, decider = (m.to(device=device, dtype=dtype).eval() for m in (backbone.model, merger, decider))
    num_tokens, image_size = backbone.num_image_tokens, backbone.image_size
    for budget in args.budgets or []:
        for name in args.baselines:
            try:
                keep_counts_for_budget(budget, num_tokens, args.baseline_layers[: 1 if name == "fastv" else None],
                                       len(model.model.language_model.layers))
            except ValueError as exc:
                raise UsageError(f"--budgets {budget:g} ({name}): {exc}") from None
    loader = vqa_loader(eval_samples(args, args.seed), backbone.collate_prompt, args.batch_size, shuffle=False,
                        seed=args.seed)
    batches = [batch_to(b, device, dtype, image_size=image_size) for b in loader]
    results = evaluate(model, batches, backbone.tokenizer, args.modes, decider, merger, layers, args.baselines,
                       args.budgets, args.baseline_layers, args.seed, args.max_new_tokens, warmup=args.warmup,
                       iters=args.latency_iters, temperature=temperature, progress=not args.no_progress)
    results["setup"] = {"checkpoint": args.checkpoint, "tiny_random": bool(args.tiny_random),
                        "data": args.data or args.cifar_vqa or "generated (random images)",
                        "samples": sum(b["input_ids"].shape[0] for b in batches), "batch_size": args.batch_size,
                        "device": str(device), "dtype": args.dtype, "pruning_layers": list(layers),
                        "vision_tokens": num_tokens, "num_layers": len(model.model.language_model.layers),
                        "merge_centres": getattr(merger, "num_centres", None), "modes": list(args.modes),
                        "merger_temperature": temperature,
                        # how the centres gather their tokens (config keys merge_similarity / _assignment / _positions)
                        "merge": None if merger is None else {key: getattr(merger, key) for key in
                                                              ("similarity", "assignment", "positions")}}
    return results


def summary_table(results: dict) -> str:
    """A plain-text table of a results dict (`evaluate`'s): per learned mode, then per baseline run and mode:
    accuracy, T̄ (vision tokens), prefill GFLOPs, prefill ms, KV cache MB (10^6 bytes)."""
    rows = [("mode", "accuracy", "T̄", "GFLOPs", "prefill ms", "KV MB")]

    def add(label: str, accuracy: float, source: dict, mode: str) -> None:
        budget = source['equivalent_token_budget'][mode]  # 8.25 shown as such, not rounded to 8.2
        rows.append((label, f"{accuracy:.3f}", f"{budget:.1f}" if round(budget, 1) == budget else f"{budget:.2f}",
                     f"{source['flops'][mode] / 1e9:.3g}", f"{source['prefill_latency_ms'][mode]:.1f}",
                     f"{source['kv_cache_bytes'][mode] / 1e6:.3g}"))

    for mode, key in ACCURACY_KEYS.items():
        if results.get(key) is not None:
            add(mode, results[key], results, mode)
    for entry in results.get("baselines", []):
        label = f"{entry['name']} @ T̄ {entry['target_budget']:.4g}"
        if "skipped" in entry:
            rows.append((label, "skipped", "", "", "", ""))
            continue
        for mode in entry["equivalent_token_budget"]:
            add(f"{label} {mode}", entry[ACCURACY_KEYS[mode]], entry, mode)
    def shown(text: str) -> int:  # columns on a terminal: the macron of T̄ combines with its T
        return sum(not unicodedata.combining(c) for c in text)

    widths = [max(shown(row[i]) for row in rows) for i in range(len(rows[0]))]
    pad = [(lambda cell, w: cell + " " * (w - shown(cell)))] + [lambda cell, w: " " * (w - shown(cell)) + cell] * 5
    return "\n".join("  ".join(pad[i](cell, w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)
