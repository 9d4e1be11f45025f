"""Train a whole tiny LLaVA (random-init CLIP tower + projector + LLaMA) on the CIFAR-10 VQA set, so that
pruning is measured on a model whose answers depend on the image (`python train_tiny_llava.py`).

Writes to --out: tiny_llava.pt (a checkpoint `load_tiny_llava` reads, weights_only-loadable: the
LlavaConfig as a dict, the tokenizer's words, the weights, the model fingerprint, the accuracy),
tiny_llava.json (val / test accuracy by question kind, steps, seconds) and metrics.jsonl.

`--init PATH` continues training a saved tiny_llava.pt instead of a random init: the architecture (and word list)
are the checkpoint's, the optimizer restarts (fresh AdamW, warmup + cosine over this run's steps: a new cycle,
not the rest of the old one), and `total_steps` = the checkpoint's `step` + this run's steps is recorded.
"""
import argparse
import json
import math
import os
import time
from typing import Optional, Sequence

import torch

from utils import checkpoint
from utils.errors import CheckpointError, NumericalError, UsageError, error_line, require_finite, run_cli
from utils.timing import StepBudget
from utils.tracking import progress
from vlm.data import (VQACollator, batch_to, cifar10_vqa_splits, cifar10_vqa_tokenizer,
                      exact_match, vqa_accuracy, vqa_loader)
from vlm.llava import build_llava, llava_parts, num_image_tokens, tiny_llava_config
from vlm.schedule import warmup_cosine
from vlm.tokenizer import WordTokenizer
from vlm.vision_pretrain import labelled_images, pretrain_vision

FORMAT = "vlm-tiny-llava/1"
# architecture flag -> (today's default, its value in a LlavaConfig); argparse defaults are None so that a flag
# given explicitly can be told from one left out (resolved by resolve_architecture)
ARCHITECTURE = {
    "hidden_size": (128, lambda c: c.text_config.hidden_size),
    "num_layers": (32, lambda c: c.text_config.num_hidden_layers),
    "vision_hidden_size": (128, lambda c: c.vision_config.hidden_size),
    "vision_layers": (4, lambda c: c.vision_config.num_hidden_layers),
    "num_heads": (4, lambda c: c.text_config.num_attention_heads),
    "image_size": (336, lambda c: c.vision_config.image_size),
}


def model_fingerprint(model) -> dict:
    """What makes two LLaVA models interchangeable for a checkpoint: vocabulary, widths, depths, tokens."""
    config = model.config
    return {"vocab_size": int(config.text_config.vocab_size), "hidden_size": int(config.text_config.hidden_size),
            "num_layers": int(config.text_config.num_hidden_layers),
            "vision_hidden_size": int(config.vision_config.hidden_size),
            "vision_layers": int(config.vision_config.num_hidden_layers),
            "image_size": int(config.vision_config.image_size), "num_image_tokens": num_image_tokens(config),
            "image_token_id": int(config.image_token_id)}


def save_tiny_llava(path: str, model, tokenizer: WordTokenizer, step: int, metrics: dict) -> None:
    checkpoint.save(path, {"format": FORMAT, "llava_config": model.config.to_dict(), "tokenizer": list(tokenizer.words),
                           "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                           "fingerprint": model_fingerprint(model), "step": step, "metrics": metrics})


def load_tiny_llava(path: str, dtype: torch.dtype = torch.float32):
    """(model in eval mode, WordTokenizer, payload) of a tiny_llava.pt; CheckpointError naming `path`."""
    from transformers import LlavaConfig
    payload = checkpoint.load_file(path)
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tiny LLaVA checkpoint of train_tiny_llava.py "
                              f"(format {payload.get('format')!r}, expected {FORMAT!r})")
    model = build_llava(LlavaConfig.from_dict(payload["llava_config"]), dtype=dtype)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit its own LlavaConfig ({str(exc).splitlines()[0]})") from None
    return model.eval(), WordTokenizer.from_words(payload["tokenizer"]), payload


@torch.no_grad()
def evaluate_vqa(model, loader, tokenizer: WordTokenizer, device, image_size: int, amp: bool,
                 max_new_tokens: int = 3) -> dict:
    """Greedy answers of `model` on a loader of prompt batches (VQACollator with_answers=False):
    {"vqa_accuracy", "exact_match", "what_accuracy", "is_there_accuracy", "samples"} (accuracies in %)."""
    was_training = model.training
    model.eval()
    scores = {"all": [], "what": [], "is_there": []}
    for batch in loader:
        moved = batch_to(batch, device, image_size=image_size)
        inputs = {k: moved[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and torch.device(device).type == "cuda"):
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:].cpu()
        for ids, answers in zip(new.tolist(), batch["answers"]):
            prediction = tokenizer.decode(ids)
            scores["all"].append((vqa_accuracy(prediction, answers), exact_match(prediction, answers)))
            kind = "is_there" if answers[0] in ("yes", "no") else "what"  # the generated set's two kinds
            scores[kind].append(exact_match(prediction, answers))
    model.train(was_training)
    mean = lambda values: 100.0 * sum(values) / max(len(values), 1)  # noqa: E731
    return {"vqa_accuracy": mean([s[0] for s in scores["all"]]), "exact_match": mean([s[1] for s in scores["all"]]),
            "what_accuracy": mean(scores["what"]), "is_there_accuracy": mean(scores["is_there"]),
            "samples": len(scores["all"])}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from utils.cli import OneLineParser
    p = OneLineParser(description="Train a tiny LLaVA on the CIFAR-10 VQA set (random init or --init; optionally "
                      "a vision pre-training first and a frozen tower).")
    p.add_argument("--data", default="data", help="folder holding cifar-10-batches-py (materialise ../shared/data)")
    p.add_argument("--out", default="runs/tiny_llava")
    p.add_argument("--init", help="continue from the weights of this tiny_llava.pt (its architecture; architecture "
                   "flags may only repeat its values). The optimizer restarts: fresh AdamW, warmup + cosine over this "
                   "run's --steps (a new cycle). Keep --seed / --val_images / --train_images of the first run so the "
                   "held-out images stay held out")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (at most, with --minutes)")
    p.add_argument("--minutes", type=float, help="time budget of the VQA training (the vision pre-training has its "
                   "own): after 50 steps the step count is cut to what fits into 85%% of it (the rest is left for "
                   "evaluation)")
    p.add_argument("--batch_size", type=int, default=64, help="questions per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps before the cosine, of the VQA training "
                   "and of the vision pre-training (default 200)")
    p.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay of both stages (default 0.05)")
    for name, (default, _) in ARCHITECTURE.items():
        p.add_argument(f"--{name}", type=int, help=f"default {default}, or the --init checkpoint's")
    p.add_argument("--vision_pretrain_steps", type=int, default=0,
                   help="before the VQA training, train the tower + projector as a CIFAR-10 classifier for this many "
                   "steps (at most, with --vision_pretrain_minutes; default 0: none): the stand-in for LLaVA's "
                   "pretrained CLIP (vlm/vision_pretrain.py; --warmup and --weight_decay apply)")
    p.add_argument("--vision_pretrain_minutes", type=float, help="time budget of the vision pre-training, on top of "
                   "--minutes (needs --vision_pretrain_steps, the most it may take): after 50 steps the step count is "
                   "cut to what fits into 85%% of it")
    p.add_argument("--vision_pretrain_batch_size", type=int, default=256,
                   help="images per vision pre-training step (default 256; at most --train_images)")
    p.add_argument("--vision_pretrain_lr", type=float, default=1e-3,
                   help="AdamW peak learning rate of the vision pre-training (default 1e-3)")
    p.add_argument("--freeze_vision", action="store_true",
                   help="keep the vision tower fixed while the projector and the LLM train (LLaVA-1.5's recipe); needs a "
                   "trained tower: --vision_pretrain_steps, or an --init checkpoint")
    p.add_argument("--train_images", type=int, default=45000)
    p.add_argument("--val_images", type=int, default=5000)
    p.add_argument("--eval_images", type=int, default=2000,
                   help="test images scored at the end, and at most this many validation images at each evaluation "
                   "(2 questions each)")
    p.add_argument("--eval_every", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no_amp", action="store_true", help="no bf16 autocast on cuda")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """UsageError naming the flag for a value the run cannot use (before anything is read or written)."""
    for name in ("steps", "batch_size", *ARCHITECTURE, "train_images", "val_images", "eval_images", "eval_every",
                 "vision_pretrain_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name} {getattr(args, name)}: must be positive")
    for name in ("lr", "minutes", "vision_pretrain_minutes", "vision_pretrain_lr"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name} {value}: must be a positive finite number")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UsageError(f"--weight_decay {args.weight_decay}: must be a finite number >= 0")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must not be negative")
    if args.batch_size > 2 * args.train_images:  # a training loader that drops its only partial batch yields nothing
        raise UsageError(f"--batch_size {args.batch_size}: more than the {2 * args.train_images} questions of "
                         f"--train_images {args.train_images} (2 per image)")
    if args.vision_pretrain_steps < 0:
        raise UsageError(f"--vision_pretrain_steps {args.vision_pretrain_steps}: must be 0 (none) or positive")
    if args.vision_pretrain_steps and args.vision_pretrain_batch_size > args.train_images:
        raise UsageError(f"--vision_pretrain_batch_size {args.vision_pretrain_batch_size}: more than the "
                         f"--train_images {args.train_images}")
    if args.vision_pretrain_minutes is not None and args.vision_pretrain_steps == 0:
        raise UsageError(f"--vision_pretrain_minutes {args.vision_pretrain_minutes:g}: give --vision_pretrain_steps "
                         f"too (the most steps it may take)")
    if args.freeze_vision and not args.vision_pretrain_steps and args.init is None:
        raise UsageError("--freeze_vision: the tower would stay at its random init; pre-train it "
                         "(--vision_pretrain_steps) or continue a trained model (--init)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here")
    return torch.device(name)


def resolve_architecture(args: argparse.Namespace, config=None, source: str = "") -> None:
    """Fill the architecture flags left out (None) in `args`: from `config` (the LlavaConfig of the --init
    checkpoint at `source`) when given, else from today's defaults (ARCHITECTURE).

    Raises UsageError naming the flag and both values when a flag given explicitly differs from `config`.
    """
    for name, (default, value_in) in ARCHITECTURE.items():
        given = getattr(args, name)
        if config is None:
            setattr(args, name, default if given is None else given)
            continue
        saved = int(value_in(config))
        if given is not None and given != saved:
            raise UsageError(f"--{name} {given}: differs from the --init checkpoint {source} ({name} {saved}); "
                             f"leave it out to continue that model")
        setattr(args, name, saved)


def initial_model(args: argparse.Namespace):
    """(model in train mode on the CPU, WordTokenizer, init record) to start training from: a random init of the
    architecture flags, or with --init the checkpoint's weights (load_tiny_llava) and architecture. The init
    record is None or {"path", "sha256" (of the file), "step" (its payload["step"])}. Resolves the architecture
    flags in `args` (resolve_architecture).

    Raises CheckpointError (one line, "--init <path>: ...") for a missing or foreign file or one whose word list
    is not the CIFAR-10 VQA one; UsageError for an architecture flag that contradicts the checkpoint.
    """
    tokenizer = cifar10_vqa_tokenizer()
    if args.init is None:
        resolve_architecture(args)
        config = tiny_llava_config(len(tokenizer), tokenizer.image_token_id, tokenizer.pad_token_id,
                                   num_layers=args.num_layers, hidden_size=args.hidden_size,
                                   vision_hidden_size=args.vision_hidden_size, vision_layers=args.vision_layers,
                                   image_size=args.image_size, num_heads=args.num_heads)
        return build_llava(config).train(), tokenizer, None
    try:
        model, saved_tokenizer, payload = load_tiny_llava(args.init)
    except CheckpointError as exc:
        raise CheckpointError(f"--init {exc}") from None
    if list(saved_tokenizer.words) != list(tokenizer.words):
        raise CheckpointError(f"--init {args.init}: its word list ({len(saved_tokenizer)} words) is not the "
                              f"CIFAR-10 VQA one ({len(tokenizer)} words)")
    resolve_architecture(args, model.config, args.init)
    record = {"path": args.init, "sha256": checkpoint.sha256_of(args.init), "step": int(payload.get("step", 0))}
    return model.train(), saved_tokenizer, record


def refuse_overwrite(args: argparse.Namespace) -> None:
    """UsageError when --out already holds a tiny_llava.pt that this run would replace without continuing it
    (no --init, or --init of another file): a trained model is never overwritten by a fresh one."""
    existing = os.path.join(args.out, "tiny_llava.pt")
    if not os.path.exists(existing):
        return
    if args.init is not None and os.path.realpath(args.init) == os.path.realpath(existing):
        return
    raise UsageError(f"--out {args.out}: holds a trained tiny_llava.pt; continue it with --init {existing}, "
                     f"or choose another --out")


def pretrain(args: argparse.Namespace) -> dict:
    """Train, evaluate, save; returns the summary written to tiny_llava.json. With --init the weights start from
    that checkpoint and a fresh AdamW runs a new warmup + cosine cycle over this run's steps."""
    device = resolve_device(args.device)
    refuse_overwrite(args)
    torch.manual_seed(args.seed)
    model, tokenizer, init = initial_model(args)
    init_step = init["step"] if init else 0
    if init:
        print(f"continuing {args.init} (step {init_step}): a fresh optimizer cycle of this run's steps", flush=True)
    train, val, test = cifar10_vqa_splits(args.data, args.seed, args.train_images, args.val_images)
    test = test[:2 * args.eval_images]
    os.makedirs(args.out, exist_ok=True)
    model = model.to(device).train()
    tokens = num_image_tokens(model.config)
    amp = not args.no_amp and device.type == "cuda"
    loader = lambda samples, answers, shuffle, seed: vqa_loader(  # noqa: E731
        samples, VQACollator(tokenizer, tokens, args.image_size, with_answers=answers, raw_images=True),
        args.batch_size, shuffle, seed, workers=args.workers, drop_last=shuffle)
    val_loader = loader(val[:2 * min(len(val) // 2, args.eval_images)], False, False, 0)
    vision_records, vision = [], None
    if args.vision_pretrain_steps:
        vision = pretrain_vision(model, labelled_images(train), labelled_images(val), image_size=args.image_size,
                                 steps=args.vision_pretrain_steps, minutes=args.vision_pretrain_minutes,
                                 batch_size=args.vision_pretrain_batch_size, lr=args.vision_pretrain_lr,
                                 weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed, amp=amp,
                                 record=vision_records.append, log=lambda line: print(line, flush=True))
    if args.freeze_vision:
        llava_parts(model).vision_tower.requires_grad_(False)
    # fused: one kernel per step for all parameters on CUDA (the tiny model has ~100 small tensors)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    total = args.steps
    schedule = lambda step: warmup_cosine(step, total, args.warmup)  # noqa: E731 - reads `total` as it is cut
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    # continuing in the init's own folder appends to its metrics.jsonl, so that history is kept
    same_folder = init is not None and os.path.samefile(os.path.dirname(os.path.abspath(args.init)), args.out)
    start, step, epoch = time.time(), 0, 0
    budget = StepBudget(args.minutes, args.steps, device)
    bar = progress(range(total), total, "tiny llava", not args.no_progress)
    steps_iter = iter(bar)
    with open(metrics_path, "a" if same_folder else "w") as metrics:
        metrics.writelines(json.dumps(record) + "\n" for record in vision_records)
        while step < total:
            # shuffles offset by the init's steps: a continued run does not replay the first run's batch order
            for batch in loader(train, True, True, args.seed + init_step + epoch):
                moved = batch_to(batch, device, image_size=args.image_size)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    loss = model(input_ids=moved["input_ids"], attention_mask=moved["attention_mask"],
                                 pixel_values=moved["pixel_values"], labels=moved["labels"]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                next(steps_iter, None)
                fitted = budget.after(step)  # fit the run into the time budget
                if fitted:
                    per_step, total = fitted
                    print(f"{per_step * 1000:.1f} ms per step: training {total} steps", flush=True)
                evaluating = step % args.eval_every == 0 or step == total
                if step % 50 and not evaluating:
                    continue  # no host sync on the loss between records: the CPU queues the next steps
                value = require_finite(float(loss.detach()), f"step {step}", "no tiny_llava.pt written; lower --lr")
                record = {"type": "step", "step": step, "total_steps": init_step + step, "loss": value,
                          "lr": scheduler.get_last_lr()[0]}
                if evaluating:
                    record.update({f"val_{k}": v for k, v in evaluate_vqa(model, val_loader, tokenizer, device,
                                                                           args.image_size, amp).items()})
                    print(f"step {step}: loss {record['loss']:.4f}  val exact match {record['val_exact_match']:.2f}%",
                          flush=True)
                if step % 50 == 0 or "val_exact_match" in record:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if step == total:
                    break
            epoch += 1
    seconds = time.time() - start
    bad = checkpoint.non_finite_tensors(model.state_dict().items())
    if bad:  # the loss is checked every 50 steps only: the weights may have gone after the last check
        raise NumericalError(f"step {step}: non-finite weights in {', '.join(bad[:3])} (the training diverged); "
                             f"no tiny_llava.pt written; lower --lr")
    val_metrics = evaluate_vqa(model, val_loader, tokenizer, device, args.image_size, amp)
    test_metrics = evaluate_vqa(model, loader(test, False, False, 0), tokenizer, device, args.image_size, amp)
    model_path = os.path.join(args.out, "tiny_llava.pt")
    summary = {"checkpoint": model_path, "steps": step, "total_steps": init_step + step, "init": init,
               "epochs_seen": round(step * args.batch_size / len(train), 3),
               "train_seconds": round(seconds, 1), "final_loss": float(loss.detach()), "vision_pretrain": vision,
               "vision_frozen": bool(args.freeze_vision), "val": val_metrics,
               "test": test_metrics, "fingerprint": model_fingerprint(model), "args": vars(args),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    # atomic (temp file + rename): with --out the init's folder, the init file stays whole until this one is written
    save_tiny_llava(model_path, model.cpu(), tokenizer, init_step + step,
                    {"val": val_metrics, "test": test_metrics, "init": init, "total_steps": init_step + step})
    checkpoint.atomic_write_json(os.path.join(args.out, "tiny_llava.json"), summary, indent=2)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    def report(summary: dict) -> None:
        test = summary["test"]
        print(f"test: exact match {test['exact_match']:.2f}% (what {test['what_accuracy']:.2f}%, "
              f"is there {test['is_there_accuracy']:.2f}%) on {test['samples']} questions; {summary['checkpoint']}")

    return run_cli(lambda: pretrain(parse_args(argv)), report, expected=[(NumericalError, error_line(3))])
