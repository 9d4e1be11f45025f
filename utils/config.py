"""RunConfig: every flag of a run in one frozen, hashable dataclass.

The config is stored (as plain types) in every checkpoint; its hash over the
fields that define the experiment names lineage. Run-control fields (where to
write, whether to resume, how to log) are left out of the hash, and so is
`pruning_times`, so a finished run can be extended without breaking lineage.
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Optional, Tuple

RUN_CONTROL_FIELDS = frozenset({
    "data", "save_dir", "exp_name", "resume", "resume_from", "workers", "print_freq", "no_wandb",
    "wandb_project", "wandb_mode", "device", "pruning_times", "deterministic", "progress", "checkpoint_interval",
    "channels_last", "compile", "cuda_graph", "fused_route",
})


# --branch kinds (with --resume_from): continue = the parent's next round, pruned from its weights; the
# lottery-ticket controls re-train the parent's round (training/controls.py)
CONTROLS = ("retrain", "random_reinit", "random_prune")
BRANCH_KINDS = ("continue",) + CONTROLS

# What runs saved before a field existed did (issue 16): they pruned the stem and kept
# max(1, round(n)) + round((C - round(n)) * fillback_rate) channels.
LEGACY_VALUES = {"conv1": True, "refill_count": "nearest"}


@dataclass(frozen=True)
class RunConfig:
    # model and data
    arch: str = "res20s"
    dataset: str = "cifar100"
    data: str = "data"
    val_size: Optional[int] = None
    # rounds
    struct: str = "rsst"
    rate: float = 0.2
    pruning_times: int = 20
    prune_type: str = "lt"
    rewind_epoch: int = 24
    prune_classifier: bool = False  # --fc (synonym --prune_classifier): prune every classifier head
    conv1: bool = False  # --conv1: prune the stem (conv1 / patch_embed.proj), dense by default
    branch: Optional[str] = None  # with resume_from: continue (None) or a control (training/controls.py)
    # optimisation, per round
    epochs: int = 120
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: Optional[int] = None  # None: resolved by resolve_schedule (the CLI stores the effective value)
    decreasing_lr: Optional[Tuple[int, ...]] = None  # None: resolved likewise
    seed: int = 1
    amp: str = "auto"
    nan_policy: str = "stop"
    # structured modes
    criteria: str = "l1"
    criteria_batches: int = 4
    fillback_rate: float = 0.0
    refill_count: str = "reference"  # kept channels: reference (Structure-LTH) or nearest
    vit_structured: bool = False
    vit_prune_target: str = "both"
    block_size: int = 8
    block_density: float = 0.5
    token_keep: Tuple[int, ...] = ()
    k_anchors: int = 10
    alpha: float = 0.5
    token_start_block: int = 1
    RST_schedule: str = "exp_custom_exponents"
    reg_granularity_prune: float = 1.0
    exponents: int = 4
    # run control
    save_dir: Optional[str] = None
    exp_name: str = ""
    resume: bool = False
    resume_from: Optional[str] = None
    checkpoint_interval: float = 30.0
    workers: int = 2
    print_freq: int = 50
    no_wandb: bool = False
    wandb_project: str = "RSST"
    wandb_mode: str = "offline"
    deterministic: bool = False
    device: str = "auto"
    progress: bool = True
    channels_last: str = "auto"
    compile: str = "auto"
    cuda_graph: bool = True
    fused_route: str = "auto"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
        if "arch" in values:  # a saved config: those written before a field existed ran with its old behaviour
            kwargs = {**LEGACY_VALUES, **kwargs}
        return cls(**_upgrade_legacy_schedule(kwargs))

    def experiment_fields(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL_FIELDS}

    def config_hash(self) -> str:
        fields = self.experiment_fields()
        if fields["branch"] is None:  # hashes of runs made before --branch existed stay as they were
            del fields["branch"]
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def schedule(self) -> Tuple[int, Tuple[int, ...]]:
        """The effective (warm-up epochs, LR milestones) of a round; see resolve_schedule."""
        return resolve_schedule(self.epochs, self.warmup, self.decreasing_lr)

    def milestones(self) -> Tuple[int, ...]:
        return self.schedule()[1]


DEFAULT_WARMUP = 20  # epochs, as in the RSST code's main_imp_fillback.py


def resolve_schedule(epochs: int, warmup: Optional[int] = None,
                     milestones: Optional[Tuple[int, ...]] = None) -> Tuple[int, Tuple[int, ...]]:
    """Warm-up and LR milestones resolved together, so a round always has an epoch at full `--lr`.

    warmup: given, else min(20, epochs // 6) and, with given milestones, below the first one.
    milestones: given, else 50 % and 75 % of `epochs`; when a given warm-up reaches the first of
    those, 50 % and 75 % of the epochs after the warm-up instead. Defaults at or before the end of
    the warm-up or at/after `epochs` are dropped, equal ones merged (so a 1-epoch round has none).
    Given values are returned unchanged (the CLI refuses a milestone at or before the warm-up's end).
    """
    if warmup is None:
        warmup = min(DEFAULT_WARMUP, epochs // 6)
        if milestones:
            warmup = min(warmup, milestones[0] - 1)
    if milestones is None:
        start = 0 if epochs // 2 > warmup else warmup
        span = epochs - start
        milestones = tuple(sorted({m for m in (start + span // 2, start + (span * 3) // 4) if warmup < m < epochs}))
    return max(warmup, 0), tuple(milestones)


def _upgrade_legacy_schedule(fields: dict) -> dict:
    """Configs saved before warm-up and milestones were resolved hold the defaults as 20 and []:
    the warm-up a round used (20, or epochs // 6 when 20 did not fit) and default milestones."""
    epochs, warmup = fields.get("epochs", RunConfig.epochs), fields.get("warmup")
    if warmup is not None and warmup >= epochs:
        fields["warmup"] = warmup = epochs // 6
    if warmup is not None and fields.get("decreasing_lr") == ():
        fields["decreasing_lr"] = resolve_schedule(epochs, warmup, None)[1]
    return fields


def config_differences(old: dict, new: dict) -> list:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
