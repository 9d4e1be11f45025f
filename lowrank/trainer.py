"""Training of a low-rank factoriser on a feature cache (SPEC §6): AdamW, ReduceLROnPlateau on the
validation MSE, early stopping, best model by validation MSE, AdaLoRA rank allocation.

`prepare(config)` reads and checks everything (cache, shapes, rank, resume file, allocator
schedule) and writes nothing; `train(prepared)` runs and writes the files of lowrank/run_outputs.py.

With --use_rank_allocator the rank shrinks during training, so the best model, the learning-rate
schedule and early stopping only consider epochs that end at the final rank (after step
T - allocator_final_warmup); the saved model is physically truncated to the kept ranks.
"""
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from tqdm import tqdm

from lowrank.cache import FeatureCache, split_indices
from lowrank.losses import LossTerms, factorisation_loss
from lowrank.models import create_model, load_trained, save_trained
from lowrank.rank_allocation import AllocatorSettings, RankAllocation, check_settings, effective_rank
from lowrank.run_outputs import BEST_MODEL, HISTORY, RunLog, arch_dir, plot_losses, read_history, write_history
from lowrank.train_cli import SPLIT_SEED, VAL_FRACTION, TrainConfig
from utils.errors import NumericalError, UsageError
from utils.seeding import seed_everything

PLATEAU_FACTOR = 0.5


@dataclass
class Prepared:
    config: TrainConfig
    cache: FeatureCache
    model: torch.nn.Module
    previous: Optional[dict]      # meta of the resumed best_model.pt
    history: List[dict]
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    total_steps: int
    allocator: Optional[AllocatorSettings]


def _open_cache(path: str) -> FeatureCache:
    try:
        return FeatureCache(path)
    except ValueError as exc:
        raise UsageError(f"--features: {exc}") from None


def _resumed(config: TrainConfig, cache: FeatureCache):
    directory = arch_dir(config.results_dir, config.arch)
    path = os.path.join(directory, BEST_MODEL)
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no {path} to resume from")
    model, meta = load_trained(path)
    if meta["encoder"] != cache.encoder:
        raise UsageError(f"--resume: {path} was trained on features of encoder {meta['encoder']!r}, "
                         f"--features {config.features} holds encoder {cache.encoder!r}")
    if (meta["num_tokens"], meta["dim"]) != tuple(cache.shape):
        raise UsageError(f"--resume: {path} takes features [{meta['num_tokens']}, {meta['dim']}], "
                         f"--features {config.features} holds {list(cache.shape)}")
    if config.use_rank_allocator and meta.get("allocated"):
        raise UsageError(f"--use_rank_allocator with --resume: {path} already holds its allocated rank "
                         f"{meta['rank']}; resume without --use_rank_allocator to fine-tune it")
    try:
        history = read_history(directory)
    except ValueError as exc:
        raise UsageError(f"--resume: {exc}") from None
    return model, meta, history


def prepare(config: TrainConfig) -> Prepared:
    """Check the cache, shapes, rank, resume file and allocator schedule; raise UsageError (one line) on any
    problem. Reads the cache index only (the features are loaded by `train`)."""
    cache = _open_cache(config.features)
    num_tokens, dim = cache.shape
    if config.resume:
        model, previous, history = _resumed(config, cache)
    else:
        seed_everything(SPLIT_SEED, deterministic=False)  # the initial weights and dropout masks
        model, previous, history = create_model(config.arch, dim, num_tokens, config.rank, config.dropout), None, []
    try:
        train_idx, val_idx = split_indices(len(cache), VAL_FRACTION, SPLIT_SEED)
    except ValueError as exc:
        raise UsageError(f"--features {config.features}: {exc}") from None
    total_steps = config.epochs * math.ceil(len(train_idx) / config.batch_size)
    allocator = None
    if config.use_rank_allocator:
        allocator = AllocatorSettings(
            init_warmup=config.allocator_init_warmup if config.allocator_init_warmup is not None else total_steps // 10,
            final_warmup=config.allocator_final_warmup if config.allocator_final_warmup is not None
            else total_steps // 5,
            mask_interval=config.allocator_mask_interval, keep_ratio=config.allocator_keep_ratio)
        check_settings(allocator, model.rank, total_steps)
    return Prepared(config, cache, model, previous, history, train_idx, val_idx, total_steps, allocator)


def evaluate(model: torch.nn.Module, features: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean reconstruction MSE of `model` over features [count, N, D] (eval mode, no gradients)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            x = features[start:start + batch_size].to(device)
            a, b = model(x)
            total += float(torch.sum((a @ b - x) ** 2))
    model.train()
    return total / features.numel()


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, lambda_b: float,
                  lambda_ortho: float, allocation: Optional[RankAllocation] = None, step: int = 1,
                  where: str = "") -> Tuple[LossTerms, Optional[int]]:
    """One optimiser step on x [batch, N, D]: loss, backward, AdamW, then the rank allocation (step counts
    from 1). Returns (loss terms, effective rank after allocation or None). Raises NumericalError naming
    `where` and the step when the loss is not finite (checked before the update, so weights stay finite)."""
    terms = factorisation_loss(*model(x), x, lambda_b, lambda_ortho)
    if not torch.isfinite(terms.total):
        raise NumericalError(f"{where}step {step}: the loss is {float(terms.total.detach())}")
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    optimizer.step()
    return terms, (allocation.step(step) if allocation is not None else None)


def resident(features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`features` moved to a CUDA device when they take under a quarter of its free memory (no host
    gather and copy per step), else left in host memory."""
    if device.type == "cuda" and features.numel() * features.element_size() < torch.cuda.mem_get_info(device)[0] // 4:
        return features.to(device)
    return features


def previous_run_exists(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, HISTORY)) or os.path.isfile(os.path.join(directory, BEST_MODEL))


def _saved_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model to store: AdaLoRA with masked triplets is truncated to its kept ranks."""
    return model.truncated() if hasattr(model, "truncated") and effective_rank(model) < model.rank else model


class Trainer:
    """One training run of a Prepared setup; `run()` returns the final summary dict."""

    def __init__(self, prepared: Prepared):
        self.p, config = prepared, prepared.config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = prepared.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="min", factor=PLATEAU_FACTOR,
                                                                    patience=max(1, config.patience // 3))
        self.allocation = (RankAllocation(self.model, prepared.allocator, prepared.total_steps)
                           if prepared.allocator else None)
        previous = prepared.previous or {}
        self.best, self.best_epoch = previous.get("best_val_mse", math.inf), previous.get("epoch")
        self.directory = arch_dir(config.results_dir, config.arch)
        self.step = 0

    def meta(self, saved: torch.nn.Module, epoch: int) -> dict:
        c, cache = self.p.config, self.p.cache
        return {"arch": c.arch, "dim": cache.shape[1], "num_tokens": cache.shape[0], "rank": saved.rank,
                "dropout": saved.dropout, "encoder": cache.encoder, "epoch": epoch, "best_val_mse": self.best,
                "allocated": bool(self.allocation) or bool((self.p.previous or {}).get("allocated")),
                "features": c.features}

    def train_epoch(self, features: torch.Tensor, epoch: int, log: RunLog) -> dict:
        """One pass over `features` in a seeded random order; returns mean loss terms."""
        c = self.p.config
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(SPLIT_SEED + epoch))
        order = order.to(features.device)
        sums, batches = {}, range(0, len(features), c.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None)
        for start in bar:
            x = features[order[start:start + c.batch_size]].to(self.device)
            self.step += 1
            terms, rank = training_step(self.model, self.optimizer, x, c.lambda_B, c.lambda_ortho, self.allocation,
                                        self.step, f"epoch {epoch}, ")
            if rank is not None:
                log.rank(self.step, rank)
            for name, value in terms._asdict().items():
                sums[name] = sums.get(name, 0.0) + value.detach() * len(x)
            if not bar.disable:  # the postfix reads values back from the device
                bar.set_postfix(mse=f"{float(terms.mse.detach()):.4g}", rank=effective_rank(self.model))
        return {name: float(total) / len(features) for name, total in sums.items()}

    def run(self) -> dict:
        c, p = self.p.config, self.p
        features = p.cache.load_all()
        train_x, val_x = resident(features[p.train_idx], self.device), resident(features[p.val_idx], self.device)
        if not c.resume and previous_run_exists(self.directory):
            print(f"note: starting afresh in {self.directory}: the previous run's history.json and best_model.pt "
                  f"will be replaced (--resume continues them)", file=sys.stderr)
        os.makedirs(self.directory, exist_ok=True)
        log = RunLog(self.directory, dict(c.as_dict(), encoder=p.cache.encoder, shape=list(p.cache.shape),
                                          train_samples=len(train_x), val_samples=len(val_x), device=str(self.device),
                                          total_steps=p.total_steps, start_rank=self.model.rank,
                                          allocator=p.allocator.__dict__ if p.allocator else None))
        try:
            summary = self.epochs(train_x, val_x, log)
        except NumericalError as exc:
            log.line(f"stopped: {exc}")
            raise
        finally:
            log.close()
        return summary

    def end_of_epoch(self, epoch: int, train_terms: dict, val_mse: float, seconds: float) -> dict:
        """Record the epoch; step the LR schedule and save the best model at the final rank. Returns the record
        with `improved` (a new best) and `counted` (the epoch counts for early stopping)."""
        counted = self.allocation is None or self.allocation.finished(self.step)
        improved = counted and val_mse < self.best
        record = {"epoch": epoch, "train_loss": train_terms["total"], "train_mse": train_terms["mse"],
                  "train_b_penalty": train_terms["b_penalty"], "train_orthogonality": train_terms["orthogonality"],
                  "val_mse": val_mse, "lr": self.optimizer.param_groups[0]["lr"],
                  "effective_rank": effective_rank(self.model), "step": self.step, "seconds": seconds}
        self.p.history.append(record)
        write_history(self.directory, self.p.history)
        if counted:
            self.scheduler.step(val_mse)
        if improved:
            self.best, self.best_epoch = val_mse, epoch
            saved = _saved_copy(self.model)
            save_trained(os.path.join(self.directory, BEST_MODEL), saved, self.meta(saved, epoch))
        return dict(record, improved=improved, counted=counted)

    def epochs(self, train_x: torch.Tensor, val_x: torch.Tensor, log: RunLog) -> dict:
        """The epoch loop with early stopping, then the plot and the summary."""
        c, history = self.p.config, self.p.history
        start = history[-1]["epoch"] if history else 0
        torch.manual_seed(SPLIT_SEED + start)  # dropout masks: a resumed run repeats too
        log.line(f"{c.arch} rank {self.model.rank} on {len(train_x)} train / {len(val_x)} val samples "
                 f"{list(self.p.cache.shape)}, epochs {start + 1}..{start + c.epochs}, device {self.device}")
        started, bad, stopped_early = time.time(), 0, False
        for epoch in range(start + 1, start + c.epochs + 1):
            train_terms = self.train_epoch(train_x, epoch, log)
            val_mse = evaluate(self.model, val_x, c.batch_size, self.device)
            record = self.end_of_epoch(epoch, train_terms, val_mse, round(time.time() - started, 3))
            if record["counted"]:
                bad = 0 if record["improved"] else bad + 1
            log.line(f"epoch {epoch}: train mse {record['train_mse']:.6g} loss {record['train_loss']:.6g}, "
                     f"val mse {val_mse:.6g}, rank {record['effective_rank']}, lr {record['lr']:.3g}"
                     + (" (best)" if record["improved"] else ""))
            if bad >= c.patience:
                stopped_early = True
                log.line(f"early stop: no lower validation MSE for {bad} epochs (patience {c.patience})")
                break
        plot_losses(self.directory, history)
        summary = {"arch": c.arch, "best_val_mse": self.best, "best_epoch": self.best_epoch,
                   "epochs_run": epoch - start, "last_epoch": epoch, "stopped_early": stopped_early,
                   "final_rank": effective_rank(self.model), "steps": self.step,
                   "parameters": sum(t.numel() for t in _saved_copy(self.model).parameters()),
                   "seconds": round(time.time() - started, 3), "log_dir": log.path}
        log.line(f"done: best val mse {self.best:.6g} at epoch {self.best_epoch}, final rank {summary['final_rank']}")
        log.summary(summary)
        return summary


def train(prepared: Prepared) -> dict:
    """Run the training of `prepared`; prints and returns the summary."""
    summary = Trainer(prepared).run()
    print(f"{summary['arch']}: best val MSE {summary['best_val_mse']:.6g} (epoch {summary['best_epoch']}), "
          f"rank {summary['final_rank']}, {summary['epochs_run']} epochs"
          f"{' (early stop)' if summary['stopped_early'] else ''}; outputs in "
          f"{arch_dir(prepared.config.results_dir, prepared.config.arch)}")
    return summary
