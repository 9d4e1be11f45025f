"""Training of the merger, the layer pruner and the discriminator on a frozen LLaVA (SPEC §5, issue 11 item 4).

Per batch: one unpruned forward (`origin`, no grad: the real run) and one pruned forward (`train`: merger
with Gumbel-top-k + soft keep masks: the fake run), both with hidden states. The generator loss
task_loss_weight · CE(answer tokens) + merge sparsity (+ the pruner budget when pruner_keep_ratio is set)
+ adv_loss_weight · adversarial updates the merger and
the pruner (their own AdamW each); the discriminator's real/fake BCE on detached hidden states updates the
discriminator (its own AdamW). The temperature anneals with `temperature_at` over the run.
A step whose losses or gradients are not finite changes nothing (no optimizer steps); `nan_policy` stop then
ends the run with exit 3 (the last checkpoint is the last good state), skip_batch goes on to the next batch.
Writes to save_dir: checkpoint_<step>.pt (numbered, atomic), metrics.jsonl, log.txt; wandb mirrors the records.
"""
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from utils.checkpoint import non_finite_tensors, remove_quietly
from utils.errors import CheckpointError, NumericalError, UsageError, error_line, run_cli
from utils.seeding import capture_rng_state, restore_rng_state
from utils.tracking import progress, read_records, wandb_row
from vlm import checkpoints as ckpt
from vlm.config import VLMPruningConfig, load_config
from vlm.losses import (discriminator_loss, generator_adversarial_loss, merge_sparsity_loss, pruner_budget_loss,
                        task_loss)
from vlm.schedule import temperature_at


def make_optimizers(config: VLMPruningConfig, modules: Dict[str, torch.nn.Module]) -> Dict[str, torch.optim.Optimizer]:
    """One AdamW per module, over that module's parameters only."""
    rates = {"merger": config.lr_merger, "pruner": config.lr_pruner, "discriminator": config.lr_discriminator}
    return {name: torch.optim.AdamW(modules[name].parameters(), lr=rates[name], weight_decay=config.weight_decay)
            for name in ckpt.MODULES}


def compute_losses(model, modules: dict, batch: dict, config: VLMPruningConfig, temperature: float) -> dict:
    """The four losses of one batch (scalars; `generator` = weighted task + sparsity + adversarial) plus
    `kept` (merger soft count) and `tokens` (T̄ of the pruned run) for logging."""
    from vlm.pruned_forward import equivalent_token_budget, pruned_forward
    with torch.no_grad():
        real = pruned_forward(model, batch, "origin", output_hidden_states=True)
    fake = pruned_forward(model, batch, "train", decider=modules["pruner"], merger=modules["merger"],
                          temperature=temperature, output_hidden_states=True)
    discriminator = modules["discriminator"]
    task = task_loss(fake.logits, fake.labels)
    sparsity = merge_sparsity_loss(fake.merge.kept, fake.merge.num_centres, config.merge_sparsity_weight)
    adversarial = generator_adversarial_loss(discriminator(fake.hidden_states, fake.hidden_masks))
    if config.pruner_keep_ratio is not None:
        sparsity = sparsity + pruner_budget_loss(fake.keep, fake.keep_valid, config.pruner_keep_ratio,
                                                 config.pruner_sparsity_weight)
    disc = discriminator_loss(discriminator([h.detach() for h in real.hidden_states], real.hidden_masks),
                              discriminator([h.detach() for h in fake.hidden_states], fake.hidden_masks))
    return {"task": task, "sparsity": sparsity, "adversarial": adversarial, "discriminator": disc,
            "generator": config.task_loss_weight * task + sparsity + config.adv_loss_weight * adversarial,
            "kept": fake.merge.kept.detach().float().mean(),
            "tokens": torch.tensor(equivalent_token_budget(fake.vision_tokens_per_layer))}


def train_step(model, modules: dict, optimizers: dict, batch: dict, config: VLMPruningConfig,
               temperature: float, amp: bool) -> dict:
    """One step: merger + pruner optimizers on the generator loss, then the discriminator optimizer on its
    own loss (`backward`: each loss reaches only its own modules). Returns floats for the log, and `finite`:
    False when a loss or a gradient was not finite, in which case no optimizer stepped."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        losses = compute_losses(model, modules, batch, config, temperature)
    backward(losses, modules)
    finite = all_finite([losses["generator"], losses["discriminator"],
                         *(p.grad for name in ckpt.MODULES for p in modules[name].parameters() if p.grad is not None)])
    if finite:
        for name in ckpt.MODULES:
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(modules[name].parameters(), config.max_grad_norm)
            optimizers[name].step()
    return {**{name: float(value.detach()) for name, value in losses.items()}, "finite": finite}


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one device sync)."""
    return not non_finite_tensors(enumerate(tensors))


def backward(losses: dict, modules: dict) -> None:
    """Gradients of the generator loss into the merger and the pruner only, and of the discriminator loss
    into the discriminator only (`inputs=`: the adversarial term leaves the discriminator's grads alone)."""
    losses["generator"].backward(inputs=[p for name in ("merger", "pruner") for p in modules[name].parameters()])
    losses["discriminator"].backward(inputs=list(modules["discriminator"].parameters()))


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> List[List[int]]:
    """Index batches of one epoch (a permutation seeded by seed and epoch; the last partial batch dropped)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, count - batch_size + 1, batch_size)]


def training_samples(config: VLMPruningConfig):
    from vlm.data import cifar10_vqa_splits, read_vqa_jsonl
    if config.dataset == "jsonl":
        return read_vqa_jsonl(config.train_jsonl)
    if not os.path.isdir(os.path.join(config.data, "cifar-10-batches-py")):
        raise UsageError(f"data {config.data!r}: no cifar-10-batches-py folder in it (materialise ../shared/data "
                         f"with its materialize_cifar10.py)")
    return cifar10_vqa_splits(config.data, config.seed, config.train_images, 0)[0]


class MetricsLog:
    """metrics.jsonl (records after the resumed step are dropped first, so a resumed run's file equals an
    uninterrupted one's), log.txt, and wandb (offline by default) when enabled and installed."""

    def __init__(self, config: VLMPruningConfig, start_step: int, run_id: str):
        self.path = os.path.join(config.save_dir, "metrics.jsonl")
        kept = [r for r in read_records(config.save_dir) if r.get("step", 0) <= start_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        self.handle = open(self.path, "a", buffering=1)
        self.log = open(os.path.join(config.save_dir, "log.txt"), "a", buffering=1)
        self.wandb = None
        if not config.no_wandb and "disabled" not in (config.wandb_mode, os.environ.get("WANDB_MODE")):
            try:
                import wandb
                self.wandb = wandb.init(project=config.wandb_project, id=run_id, resume="allow", dir=config.save_dir,
                                        mode=config.wandb_mode, config=config.to_dict())
            except Exception as exc:  # ImportError or a wandb failure: tracking must not stop the run
                self.info(f"warning: wandb off ({type(exc).__name__}: {str(exc)[:120]})")

    def info(self, message: str) -> None:
        print(message, flush=True)
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def record(self, record: dict) -> None:
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_row(record), step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        self.handle.close()
        self.log.close()


def _resume_point(config: VLMPruningConfig, backbone) -> Optional[tuple]:
    """(path, payload) of the newest valid checkpoint in save_dir when resuming; refusals as CheckpointError."""
    found = ckpt.numbered_checkpoints(config.save_dir)
    if not config.resume:
        if found:
            raise UsageError(f"save_dir {config.save_dir}: holds checkpoints; pass --resume or another save_dir")
        return None
    for path in found:
        try:
            payload = ckpt.load_checkpoint(path)
        except CheckpointError as exc:
            print(f"warning: skipping unusable checkpoint: {exc}", file=sys.stderr)
            continue
        ckpt.check_same_model(path, payload, backbone.fingerprint)
        saved = payload["config"]
        for key in ckpt.SHAPING_KEYS:
            now = config.to_dict()[key]
            if saved.get(key) != now:
                raise CheckpointError(f"{path}: saved with {key} {saved.get(key)!r}, this run has {now!r}")
        return path, payload
    return None


def train(config: VLMPruningConfig) -> dict:
    """Run (or resume) training; returns {"step", "checkpoint", "last": the last step's record}."""
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {config.device}: no CUDA device here")
    backbone = ckpt.load_backbone(config)
    samples = training_samples(config)
    if len(samples) < config.batch_size:
        raise UsageError(f"batch_size {config.batch_size}: larger than the {len(samples)} training samples")
    resume = _resume_point(config, backbone)
    if resume is not None and resume[1].get("backbone") is not None:
        backbone.model.load_state_dict(resume[1]["backbone"])
    torch.manual_seed(config.seed + 1)
    modules = ckpt.build_modules(config, backbone)
    model = backbone.model.to(device)
    modules = {name: m.to(device).train() for name, m in modules.items()}
    optimizers = make_optimizers(config, modules)
    per_epoch = len(samples) // config.batch_size
    total = config.steps if config.steps is not None else math.ceil(config.epochs * per_epoch)
    step, run_id = 0, f"vlm-{config.config_hash()}-{os.urandom(3).hex()}"
    os.makedirs(config.save_dir, exist_ok=True)
    if resume is not None:
        path, payload = resume
        ckpt.load_modules(path, payload, modules)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(payload["optimizers"][name])
        restore_rng_state(payload["rng"])
        step, run_id = payload["step"], payload["extra"].get("run_id", run_id)
    log = MetricsLog(config, step, run_id)
    log.info(f"{'resuming ' + resume[0] + ' at' if resume else 'starting at'} step {step} of {total}; "
             f"{len(samples)} samples, {per_epoch} batches per epoch, device {device}")
    amp = config.amp and device.type == "cuda"
    bar = progress(range(step, total), total - step, "vlm pruning", config.progress)
    bar_iter, record, last_path = iter(bar), {}, resume[0] if resume is not None else None
    skipped = resume[1]["extra"].get("skipped_batches", 0) if resume is not None else 0
    try:
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            batches = epoch_batches(len(samples), config.batch_size, config.seed, epoch)[offset:]
            loader = torch.utils.data.DataLoader(samples, batch_sampler=batches[:total - step],
                                                 collate_fn=backbone.collate_train, num_workers=config.workers)
            for batch in loader:
                from vlm.data import batch_to
                batch = batch_to(batch, device)
                temperature = temperature_at(step / total, config.temperature, config.temperature_min,
                                             config.temperature_anneal_rate)
                started = time.time()
                losses = train_step(model, modules, optimizers, batch, config, temperature, amp)
                if not losses.pop("finite"):
                    skipped += 1
                    if config.nan_policy == "stop":
                        raise NumericalError(non_finite_message(step + 1, losses, last_path))
                    log.info(f"step {step + 1}: non-finite loss or gradient, batch skipped (nan_policy skip_batch; "
                             f"{skipped} so far)")
                step += 1
                next(bar_iter, None)
                record = {"type": "step", "step": step, "epoch": epoch, "temperature": temperature,
                          "seconds": round(time.time() - started, 4), **{f"loss_{k}": v for k, v in losses.items()
                                                                         if k not in ("kept", "tokens")},
                          "kept": losses["kept"], "tokens": losses["tokens"], "skipped_batches": skipped}
                log.record(record)
                if step % config.save_every == 0 or step == total:
                    last_path = ckpt.checkpoint_path(config.save_dir, step)
                    ckpt.save_checkpoint(last_path, config, backbone, modules, optimizers, step,
                                         capture_rng_state(), {"run_id": run_id, "temperature": temperature,
                                                               "skipped_batches": skipped})
                    remove_quietly(ckpt.numbered_checkpoints(config.save_dir)[config.keep_checkpoints:])
                    log.info(f"step {step}: task {losses['task']:.4f}  adv {losses['adversarial']:.4f}  "
                             f"disc {losses['discriminator']:.4f}  merge kept {losses['kept']:.1f}  "
                             f"T̄ {losses['tokens']:.1f} (this batch's soft training masks; evaluation keeps "
                             f"the top-k)  tau {temperature:.3f}  -> {last_path}")
    finally:
        log.close()
    return {"step": step, "checkpoint": last_path, "last": record}


def non_finite_message(step: int, losses: dict, last_path: Optional[str]) -> str:
    """The one line of a run stopped by a non-finite loss or gradient at `step` (nothing of that step applied)."""
    values = ", ".join(f"{name} {losses[name]:.4g}" for name in ("task", "sparsity", "adversarial", "discriminator"))
    kept = f"the last checkpoint is {last_path}" if last_path else "no checkpoint was written yet"
    return (f"step {step}: non-finite loss or gradient ({values}); the run stopped before applying it and "
            f"{kept}. Lower lr_merger / lr_pruner / lr_discriminator, or nan_policy=skip_batch skips such batches")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """train_vlm_pruning.py [--config FILE] [key=value | --key value ...]; exit 2 on a usage error, 3 when a
    non-finite loss or gradient stopped the run (nan_policy stop)."""
    def work() -> dict:
        path, rest = None, list(sys.argv[1:] if argv is None else argv)
        rest = [part for item in rest for part in (item.split("=", 1) if item.startswith("--config=") else [item])]
        if "--config" in rest:
            at = rest.index("--config")
            if at + 1 == len(rest):
                raise UsageError("--config: needs a YAML file")
            path = rest[at + 1]
            rest = rest[:at] + rest[at + 2:]
        return train(load_config(path, rest))

    return run_cli(work, lambda result: print(f"done: step {result['step']}, checkpoint {result['checkpoint']}"),
                   expected=[(NumericalError, error_line(3))])
