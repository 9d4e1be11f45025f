"""The command line: the original RSST / fillback flags -> a validated RunConfig.

Every rejected value exits with code 2 and one line naming the flag, before any
run directory is created.
"""
import argparse
import difflib
import math
import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from utils import paths
from utils.config import BRANCH_KINDS, CONTROLS, RunConfig, resolve_schedule
from utils.errors import NumericalError, UsageError, error_line, os_error_line, run_cli
from utils.interrupts import Interrupted

CRITERIA = ("remain", "magnitude", "l1", "l2", "saliency")
SCHEDULES = ("x", "x^2", "x^3", "exp", "exp_custom", "exp_custom_exponents")


ACTIVATION_CRITERIA = ("l1", "l2", "saliency")
CHANNEL_MODES = ("refill", "rsst")
TOKEN_MODES = ("token", "merge")  # modes that shrink the tokens a ViT processes, not its weights
# flags that only some settings read: flag -> (is it read, given the parsed args; the setting that makes it
# unread; what reads it). A flag given explicitly with a value other than its default where it is not read
# is refused (README, "Flags a mode does not read").
_STRUCT = lambda a: f"--struct {a.struct}"  # noqa: E731
USED_ONLY_WITH = {
    "criteria": (lambda a: a.struct in CHANNEL_MODES, _STRUCT, "--struct refill or rsst"),
    "criteria_batches": (lambda a: a.struct in CHANNEL_MODES and a.criteria in ACTIVATION_CRITERIA,
                         lambda a: _STRUCT(a) if a.struct not in CHANNEL_MODES else f"--criteria {a.criteria}",
                         "--criteria l1, l2 or saliency of --struct refill or rsst"),
    "fillback_rate": (lambda a: a.struct in CHANNEL_MODES, _STRUCT, "--struct refill or rsst"),
    "vit_structured": (lambda a: a.struct in CHANNEL_MODES, _STRUCT, "--struct refill or rsst"),
    "vit_prune_target": (lambda a: a.vit_structured, lambda a: "channel-level pruning", "--vit_structured"),
    "RST_schedule": (lambda a: a.struct == "rsst", _STRUCT, "--struct rsst"),
    "reg_granularity_prune": (lambda a: a.struct == "rsst", _STRUCT, "--struct rsst"),
    "exponents": (lambda a: a.struct == "rsst" and a.RST_schedule == "exp_custom_exponents",
                  lambda a: _STRUCT(a) if a.struct != "rsst" else f"--RST_schedule {a.RST_schedule}",
                  "--RST_schedule exp_custom_exponents of --struct rsst"),
    "block_size": (lambda a: a.struct == "regroup", _STRUCT, "--struct regroup"),
    "block_density": (lambda a: a.struct == "regroup", _STRUCT, "--struct regroup"),
    "token_keep": (lambda a: a.struct in TOKEN_MODES, _STRUCT, "--struct token or merge"),
    "k_anchors": (lambda a: a.struct == "token", _STRUCT, "--struct token"),
    "alpha": (lambda a: a.struct == "token", _STRUCT, "--struct token"),
    "token_start_block": (lambda a: a.struct in TOKEN_MODES, _STRUCT, "--struct token or merge"),
    "prune_classifier": (lambda a: a.struct not in TOKEN_MODES, _STRUCT, "the modes that prune weights"),
    "conv1": (lambda a: a.struct not in TOKEN_MODES, _STRUCT, "the modes that prune weights"),
    "refill_count": (lambda a: a.struct in CHANNEL_MODES and not a.vit_structured,
                     lambda a: _STRUCT(a) if a.struct not in CHANNEL_MODES else "--vit_structured",
                     "channel-level --struct refill or rsst"),
    "rewind_epoch": (lambda a: a.prune_type == "rewind_lt", lambda a: f"--prune_type {a.prune_type}",
                     "--prune_type rewind_lt"),
}


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # `--epoch 3` is an error, not --epochs

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            unknown = message.split(": ", 1)[1].split()[0].split("=")[0]
            known = [o for a in self._actions for o in a.option_strings]
            close = difflib.get_close_matches(unknown, known, n=1)
            hint = f" (did you mean {close[0]}? flags are not abbreviated)" if close else ""
            message = f"{unknown}: unknown flag{hint}"
        raise UsageError(message)


def given_flags(argv: Optional[Sequence[str]]) -> set:
    """Destinations of the flags present in `argv`: parsed again with every default suppressed,
    so a flag given with its default value still counts as given."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _check_used(args: argparse.Namespace, given: set) -> None:
    """Refuse a flag that changes a value the chosen mode never reads (see USED_ONLY_WITH)."""
    defaults = build_parser()
    for flag, (is_used, setting, reader) in USED_ONLY_WITH.items():
        value = getattr(args, flag)
        if flag in given and value != defaults.get_default(flag) and not is_used(args):
            shown = "" if isinstance(value, bool) else " " + (",".join(map(str, value)) if isinstance(value, list)
                                                              else str(value))
            name = "--fc/--prune_classifier" if flag == "prune_classifier" else f"--{flag}"  # two spellings
            raise UsageError(f"{name}{shown}: not used with {setting(args)} (read only by {reader}); drop it")


def _milestones(text: str) -> List[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 60,90 or '60 90', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = OneLineParser(prog="main_imp_fillback.py", description="Iterative pruning (IMP / refill / RSST) runner "
                      "with numbered checkpoints, resume and lineage.")
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", default=d.arch, help="res20s, res56s, res18, vit_tiny, vit_small, or a timm model name")
    g.add_argument("--dataset", default=d.dataset, help="cifar10, cifar100 or synthetic")
    g.add_argument("--data", default=d.data, help="folder holding cifar-10-batches-py / cifar-100-python")
    g.add_argument("--val_size", type=int, default=None, help="training images held out for model selection "
                   "(default 5000; 10%% for synthetic; 0: train on all, report the last epoch)")
    g = p.add_argument_group("rounds")
    g.add_argument("--struct", default=d.struct, help="none, refill, regroup, rsst, token, lowrank, merge")
    g.add_argument("--rate", type=float, default=d.rate, help="fraction of the remaining weights pruned per round")
    g.add_argument("--pruning_times", type=int, default=d.pruning_times, help="rounds, including dense round 0")
    g.add_argument("--prune_type", default=d.prune_type, choices=("lt", "rewind_lt", "pt"),
                   help="lt: rewind to init; rewind_lt: to --rewind_epoch of round 0; pt: keep trained weights")
    g.add_argument("--rewind_epoch", type=int, default=d.rewind_epoch)
    g.add_argument("--fc", "--prune_classifier", dest="prune_classifier", action="store_true",
                   help="prune the classifier head(s) too (dense by default; --prune_classifier is a synonym)")
    g.add_argument("--conv1", action="store_true", help="prune the stem too (conv1, a ViT's patch_embed.proj; "
                   "dense by default, as in Structure-LTH)")
    g = p.add_argument_group("optimisation (per round)")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch_size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight_decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up epochs (default min(20, a sixth of "
                   "--epochs), ending before the first milestone)")
    g.add_argument("--decreasing_lr", type=_milestones, default=None, help="LR x0.1 milestones (default: 50%% "
                   "and 75%% of --epochs, or of the epochs after an explicit --warmup that reaches them)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--amp", default=d.amp, choices=("auto", "none", "bf16"),
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on the CPU)")
    g.add_argument("--nan_policy", default=d.nan_policy, choices=("stop", "skip_batch"),
                   help="on a non-finite loss: stop the run (keeping the last good checkpoint) or skip the batch")
    g = p.add_argument_group("structured modes")
    g.add_argument("--criteria", default=d.criteria, choices=CRITERIA)
    g.add_argument("--criteria_batches", type=int, default=d.criteria_batches,
                   help="training batches used by the l1/l2/saliency criteria")
    g.add_argument("--fillback_rate", type=float, default=d.fillback_rate,
                   help="refill+: also keep (C - n) x this many of the dropped channels / heads / neurons")
    g.add_argument("--refill_count", default=d.refill_count, choices=("reference", "nearest"),
                   help="channels kept: reference = int(n + (C-n) x fillback_rate) + 1 (Structure-LTH); "
                   "nearest = round(n) + round((C-round(n)) x fillback_rate)")
    g.add_argument("--vit_structured", action="store_true", help="head-level quasi-structured ViT pruning")
    g.add_argument("--vit_prune_target", default=d.vit_prune_target, choices=("head", "mlp", "both"))
    g.add_argument("--block_size", type=int, default=d.block_size,
                   help="regroup: rows per partition group (the height of a dense block)")
    g.add_argument("--block_density", type=float, default=d.block_density,
                   help="regroup: a block column is kept only if at least this fraction of it survives")
    g.add_argument("--token_keep", type=_milestones, default=None,
                   help="token / merge: kept patch tokens (merge centres) per round from round 1 "
                   "(default: (1-rate)^k of them)")
    g.add_argument("--k_anchors", type=int, default=d.k_anchors, help="token: anchors per image")
    g.add_argument("--alpha", type=float, default=d.alpha, help="token: importance vs diversity weight")
    g.add_argument("--token_start_block", type=int, default=d.token_start_block,
                   help="token / merge: the block whose input is pruned / merged")
    g.add_argument("--RST_schedule", default=d.RST_schedule, choices=SCHEDULES)
    g.add_argument("--reg_granularity_prune", type=float, default=d.reg_granularity_prune)
    g.add_argument("--exponents", type=int, default=d.exponents)
    g = p.add_argument_group("run control")
    g.add_argument("--save_dir", default=None, help="run dir (default <dataset>_<struct>_output_<exp_name>)")
    g.add_argument("--exp_name", default=d.exp_name)
    g.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint of the run dir")
    g.add_argument("--resume_from", default=None, help="branch a new run from a numbered checkpoint of any run")
    g.add_argument("--branch", default=None, choices=BRANCH_KINDS,
                   help="with --resume_from: continue (default: the parent's next round) or a lottery-ticket "
                        "control that re-trains the checkpoint's round: retrain (same masks, from the rewind "
                        "point), random_reinit (same masks, fresh init), random_prune (same per-layer sparsity, "
                        "random masks)")
    g.add_argument("--checkpoint_interval", type=float, default=d.checkpoint_interval,
                   help="seconds between epoch-level checkpoints (0: every epoch)")
    g.add_argument("--workers", type=int, default=d.workers, help="accepted for compatibility; data is in memory")
    g.add_argument("--print_freq", type=int, default=d.print_freq)
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--channels_last", default=d.channels_last, choices=("auto", "on", "off"),
                   help="NHWC memory layout (auto: on for convnets on CUDA)")
    g.add_argument("--compile", default=d.compile, choices=("auto", "on", "off"),
                   help="torch.compile the model inside the training step (auto: on for CUDA, where it measured "
                        "1.2-2x faster; falls back to eager with a warning if compilation fails)")
    g.add_argument("--no_cuda_graph", action="store_true", help="run the training step eagerly on CUDA")
    g.add_argument("--fused_route", default=d.fused_route, choices=("auto", "grouped", "vmap", "streams"),
                   help="how fused training (sweep.py --executor fused, --fused_grid) runs its cells: grouped "
                   "(grouped convolutions; for timm ViTs batched Linears and one attention over all cells), vmap, "
                   "or one CUDA stream per cell; auto: grouped for convnets, and for timm ViTs when the step "
                   "compiles; else streams (docs/fused.md)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (bit-exact resume on CPU)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--fused_grid", action="append", default=None, metavar="KEY=V1,V2",
                   help="train the cells of a grid of these flags (as sweep.py --grid; repeat for a cartesian "
                   "product) as one fused model in this process, in <--save_dir or the default run dir>/<cell> "
                   "(docs/fused.md)")
    g = p.add_argument_group("tracking")
    g.add_argument("--no_wandb", action="store_true")
    g.add_argument("--wandb_project", default=d.wandb_project)
    g.add_argument("--wandb_mode", default=d.wandb_mode, choices=("offline", "online", "disabled"))
    return p


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def validate(args: argparse.Namespace, given: Optional[set] = None) -> RunConfig:
    """A RunConfig from parsed flags; UsageError naming the flag for a bad value or (with `given`,
    the flags present on the command line) a flag the chosen mode does not read."""
    from data import DATASETS
    from models import MODELS, is_known_arch
    from pruners import STRUCTS

    paths.check_text_flags(vars(args))
    _check(0 <= args.seed < 2 ** 32, f"--seed {args.seed}: must be in [0, 2**32 - 1] (numpy's seed range)")
    _check(is_known_arch(args.arch), f"--arch: unknown architecture {args.arch!r}; choose from "
           f"{', '.join(MODELS.names())} or a timm model name")
    DATASETS[args.dataset]
    STRUCTS[args.struct]
    _check(0.0 < args.rate < 1.0, f"--rate {args.rate}: must be between 0 and 1 (exclusive)")
    _check(args.pruning_times >= 1, f"--pruning_times {args.pruning_times}: must be at least 1")
    _check(args.epochs >= 1, f"--epochs {args.epochs}: must be at least 1")
    _check(args.batch_size >= 1, f"--batch_size {args.batch_size}: must be at least 1")
    for flag in ("rate", "lr", "momentum", "weight_decay", "fillback_rate", "reg_granularity_prune", "alpha",
                 "block_density", "checkpoint_interval"):
        value = getattr(args, flag)
        _check(math.isfinite(value), f"--{flag} {value}: must be a finite number")
    _check(args.lr > 0, f"--lr {args.lr}: must be positive")
    _check(0.0 <= args.momentum < 1.0, f"--momentum {args.momentum}: must be in [0, 1)")
    _check(args.weight_decay >= 0, f"--weight_decay {args.weight_decay}: must be non-negative")
    if args.warmup is not None:
        _check(0 <= args.warmup < args.epochs, f"--warmup {args.warmup}: must be in [0, --epochs {args.epochs})")
    given_milestones = tuple(args.decreasing_lr) if args.decreasing_lr else None
    for m in given_milestones or ():
        _check(0 < m < args.epochs, f"--decreasing_lr {m}: milestones must lie inside the round "
               f"(1..{args.epochs - 1} for --epochs {args.epochs}); one at or past the end does nothing")
    if given_milestones:
        _check(list(given_milestones) == sorted(set(given_milestones)),
               f"--decreasing_lr {given_milestones}: must be increasing")
        _check(args.warmup is None or given_milestones[0] > args.warmup,
               f"--decreasing_lr {given_milestones[0]}: at or before the end of --warmup {args.warmup}, "
               f"so the round never trains at the full --lr; move the milestone or shorten the warm-up")
    warmup, milestones = resolve_schedule(args.epochs, args.warmup, given_milestones)
    if args.prune_type == "rewind_lt":
        _check(0 <= args.rewind_epoch < args.epochs, f"--rewind_epoch {args.rewind_epoch}: must be in "
               f"[0, --epochs {args.epochs}) for --prune_type rewind_lt")
    _check(args.val_size is None or args.val_size >= 0, f"--val_size {args.val_size}: must be non-negative")
    _check(args.criteria_batches >= 1, f"--criteria_batches {args.criteria_batches}: must be at least 1")
    _check(0.0 <= args.fillback_rate <= 1.0, f"--fillback_rate {args.fillback_rate}: must be in [0, 1]")
    _check(args.block_size >= 1, f"--block_size {args.block_size}: must be at least 1")
    _check(0.0 < args.block_density <= 1.0, f"--block_density {args.block_density}: must be in (0, 1]")
    _check(args.k_anchors >= 0, f"--k_anchors {args.k_anchors}: must be non-negative")
    _check(0.0 <= args.alpha <= 1.0, f"--alpha {args.alpha}: must be in [0, 1]")
    _check(args.token_start_block >= 0, f"--token_start_block {args.token_start_block}: must be non-negative")
    _check(all(t >= 1 for t in args.token_keep or ()), f"--token_keep {args.token_keep}: counts must be >= 1")
    _check(args.reg_granularity_prune >= 0, f"--reg_granularity_prune {args.reg_granularity_prune}: "
           f"must be non-negative")
    _check(args.exponents >= 1, f"--exponents {args.exponents}: must be at least 1")
    _check(args.workers >= 0, f"--workers {args.workers}: must be non-negative")
    _check(args.print_freq >= 1, f"--print_freq {args.print_freq}: must be at least 1")
    _check(args.checkpoint_interval >= 0, f"--checkpoint_interval {args.checkpoint_interval}: must be >= 0")
    _check_device(args.device)
    _check(args.branch is None or args.resume_from is not None,
           f"--branch {args.branch}: needs --resume_from <k>checkpoint.pth.tar (the run it is a branch of)")
    _check(args.branch not in CONTROLS or STRUCTS[args.struct].masks_weights,
           f"--branch {args.branch}: --struct {args.struct} has no weight masks to control; use a mode that "
           f"prunes weights (none, refill, regroup, rsst)")
    _check(not args.fused_grid, "--fused_grid: not a flag of one run (a sweep.py runner flag, a grid value or "
           "a fused cell); give it on main_imp_fillback.py's own command line")
    _check_used(args, given or set())
    return RunConfig(
        arch=args.arch, dataset=args.dataset, data=args.data, val_size=args.val_size, struct=args.struct,
        rate=args.rate, pruning_times=args.pruning_times, prune_type=args.prune_type,
        rewind_epoch=args.rewind_epoch, prune_classifier=args.prune_classifier, conv1=args.conv1, branch=args.branch,
        epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        warmup=warmup, decreasing_lr=milestones, seed=args.seed, amp=args.amp, nan_policy=args.nan_policy,
        criteria=args.criteria, criteria_batches=args.criteria_batches,
        fillback_rate=args.fillback_rate, refill_count=args.refill_count, vit_structured=args.vit_structured,
        vit_prune_target=args.vit_prune_target, block_size=args.block_size, block_density=args.block_density,
        token_keep=tuple(args.token_keep or ()), k_anchors=args.k_anchors, alpha=args.alpha,
        token_start_block=args.token_start_block, RST_schedule=args.RST_schedule,
        reg_granularity_prune=args.reg_granularity_prune, exponents=args.exponents, save_dir=args.save_dir,
        exp_name=args.exp_name, resume=args.resume,
        resume_from=args.resume_from and os.path.abspath(args.resume_from),  # replayable from any directory
        checkpoint_interval=args.checkpoint_interval, workers=args.workers, print_freq=args.print_freq,
        no_wandb=args.no_wandb, wandb_project=args.wandb_project, wandb_mode=args.wandb_mode,
        deterministic=args.deterministic, device=args.device, progress=not args.no_progress,
        channels_last=args.channels_last, compile=args.compile, cuda_graph=not args.no_cuda_graph,
        fused_route=args.fused_route)


def _check_device(name: str) -> None:
    if name in ("auto", "cpu"):
        return
    _check(name == "cuda" or name.startswith("cuda:"), f"--device {name}: use auto, cpu, cuda or cuda:N")
    _check(torch.cuda.is_available(), f"--device {name}: CUDA is not available on this machine")
    if ":" in name:
        index = name.split(":", 1)[1]
        _check(index.isdigit() and int(index) < torch.cuda.device_count(),
               f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def parse_config(argv: Optional[Sequence[str]] = None) -> RunConfig:
    config = validate(build_parser().parse_args(argv), given_flags(argv))
    return config


def main(argv: Optional[Sequence[str]] = None, run=None) -> int:
    """CLI entry: 0 done, 2 bad input, 3 non-finite loss, 1 OS error, 128 + signal when stopped by one."""
    from training.fused.grid_flag import main as fused_grid_main, wants_fused_grid
    if run is None and wants_fused_grid(sys.argv[1:] if argv is None else argv):
        return fused_grid_main(argv)

    def work() -> None:
        config = parse_config(argv)
        if run is None:
            from training.rounds import run as run_rounds
            run_rounds(config)
        else:
            run(config)

    def stopped(exc: Interrupted) -> Tuple[str, int]:
        rank = os.environ.get("RANK", "0")
        if rank.isdigit() and int(rank) > 0:  # under torchrun only rank 0 writes (and says so)
            return f"[rank {rank}] {exc}; rank 0 saved the checkpoint", exc.exit_code
        return f"{exc}; saved {exc.checkpoint}; continue with the same command plus --resume", exc.exit_code

    return run_cli(work, expected=[(NumericalError, error_line(3)),
                                   (OSError, os_error_line("; the previous checkpoints are intact")),
                                   (Interrupted, stopped), (KeyboardInterrupt, lambda exc: ("interrupted", 130))])
