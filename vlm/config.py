"""The training config of the vision-token pruner: one frozen dataclass, read from YAML, overridden on
the command line (`key=value` or `--key value`; a bool key alone, `--tiny_random`, means true).

Every key is a field of `VLMPruningConfig`; an unknown key (in the YAML or an override) or a value of
the wrong type raises UsageError naming the key and where it came from (exit 2, one line).
"""
import dataclasses
import hashlib
import json
import math
import os
import typing
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from utils.errors import UsageError

CHOICES = {"merger_type": ("simple", "question_aware"), "pruner_type": ("cross_attention", "simple"),
           "merge_positions": ("recount", "original"), "merge_assignment": ("all", "others"),
           "merge_similarity": ("dot", "cosine"),
           "dataset": ("cifar10_vqa", "jsonl"), "dtype": ("float32", "bfloat16"), "nan_policy": ("stop", "skip_batch"),
           "wandb_mode": ("offline", "online", "disabled")}


@dataclass(frozen=True)
class VLMPruningConfig:
    # merger (stage 1) -------------------------------------------------------------------------
    merger_type: str = "simple"                  # simple (importance scorer) | question_aware
    merge_ratio: float = 0.5                     # centres M = round(merge_ratio * N)
    target_merge_tokens: Optional[int] = None    # overrides merge_ratio when set
    merge_positions: str = "recount"             # RoPE positions after merging: recount (seed) | original
    merge_assignment: str = "all"                # soft-assigned tokens: all (seed) | others (centres keep their own)
    merge_similarity: str = "dot"                # assignment logits: dot (seed, Q K^T / sqrt d) | cosine
    merge_sparsity_weight: float = 1e-4          # (kept - target)^2 * weight
    lr_merger: float = 2e-5
    # layer pruner (stage 2) -------------------------------------------------------------------
    pruning_layers: Tuple[int, ...] = (10, 20, 31)
    pruner_d_internal: int = 512
    pruner_num_heads: int = 4
    pruner_type: str = "cross_attention"         # cross_attention | simple
    lr_pruner: float = 2e-5
    pruner_keep_ratio: Optional[float] = None    # kept fraction each head aims at; null: no budget loss (the seed)
    pruner_sparsity_weight: float = 1.0          # weight of sum_l (kept fraction - pruner_keep_ratio)^2
    # discriminator ----------------------------------------------------------------------------
    discriminator_layers: Tuple[int, ...] = (-1, -3, -5)
    discriminator_d_internal: int = 256
    lr_discriminator: float = 5e-4
    # temperature and losses -------------------------------------------------------------------
    temperature: float = 1.0
    temperature_min: float = 0.1
    temperature_anneal_rate: float = 0.5         # fraction of training over which tau goes linearly to the min
    adv_loss_weight: float = 1.0
    task_loss_weight: float = 25.0
    weight_decay: float = 0.0
    # model (exactly one source) ---------------------------------------------------------------
    tiny_random: bool = False                    # the tiny random LLaVA of the tests
    tiny_image_size: int = 336                   # tiny_random only: 336 px / patch 14 -> 576 vision tokens
    base_checkpoint: Optional[str] = None        # a tiny LLaVA trained by train_tiny_llava.py
    model_name_or_path: Optional[str] = None     # HF weights, e.g. llava-hf/llava-1.5-7b-hf
    dtype: str = "float32"                       # backbone weights: float32 | bfloat16
    # data ---------------------------------------------------------------------------------------
    dataset: str = "cifar10_vqa"                 # cifar10_vqa (generated) | jsonl
    data: str = "data"                           # cifar10_vqa: folder holding cifar-10-batches-py
    train_jsonl: Optional[str] = None            # jsonl: the training file
    train_images: int = 5000                     # cifar10_vqa: training images (2 questions each)
    workers: int = 0
    # training -----------------------------------------------------------------------------------
    steps: Optional[int] = 1000                  # optimizer steps (or set epochs and steps: null)
    epochs: Optional[float] = None
    batch_size: int = 8
    save_dir: str = "runs/vlm_pruning"
    save_every: int = 200                        # steps between numbered checkpoints
    keep_checkpoints: int = 3
    seed: int = 0
    device: str = "auto"                         # auto (cuda when present) | cpu | cuda[:i]
    amp: bool = True                             # bf16 autocast on cuda
    nan_policy: str = "stop"                     # a non-finite loss or gradient: stop (exit 3) | skip_batch
    max_grad_norm: Optional[float] = None        # clip each module's gradient norm before its step; null: none
    resume: bool = False
    progress: bool = True
    no_wandb: bool = False
    wandb_project: str = "vlm-token-pruning"
    wandb_mode: str = "offline"

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


FIELDS = {f.name: f for f in dataclasses.fields(VLMPruningConfig)}
_HINTS = typing.get_type_hints(VLMPruningConfig)


def _coerce(key: str, value, where: str):
    """`value` as the type of field `key`; UsageError naming the key and `where` otherwise."""
    hint = _HINTS[key]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise UsageError(f"{key}: may not be null ({where})")
    if typing.get_origin(base) is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise UsageError(f"{key} {value!r}: expected a list of integers ({where})")
        return tuple(items)
    if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, int) and not isinstance(value, bool) if base is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, str))
    if not ok:
        raise UsageError(f"{key} {value!r}: expected {base.__name__} ({where})")
    value = float(value) if base is float else value
    if base is float and not math.isfinite(value):
        raise UsageError(f"{key} {value!r}: must be a finite number ({where})")
    if key in CHOICES and value not in CHOICES[key]:
        raise UsageError(f"{key} {value!r}: choose one of {', '.join(CHOICES[key])} ({where})")
    return value


def _parse_value(text: str):
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(argv: Sequence[str]) -> List[Tuple[str, object]]:
    """(key, value) pairs of `key=value`, `--key=value`, `--key value` and bare bool `--key` items; values
    parsed as YAML scalars/lists (`pruning_layers=[5,9]`). UsageError for an item of no such form."""
    pairs, i = [], 0
    while i < len(argv):
        item = argv[i]
        name = item[2:] if item.startswith("--") else item
        if "=" in name:
            key, text = name.split("=", 1)
            i += 1
        elif item.startswith("--"):
            key = name
            if key in FIELDS and _HINTS[key] is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")
                                                          or "=" in argv[i + 1]):
                pairs.append((key, True))
                i += 1
                continue
            if i + 1 == len(argv):
                raise UsageError(f"--{key}: needs a value")
            text, i = argv[i + 1], i + 2
        else:
            raise UsageError(f"{item}: not an override (write key=value or --key value)")
        pairs.append((key.replace("-", "_") if key.replace("-", "_") in FIELDS else key, _parse_value(text)))
    return pairs


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> VLMPruningConfig:
    """The config of YAML file `path` (None: the defaults) with `overrides` (command-line items) applied,
    validated (`validate`). Raises UsageError naming the file or key."""
    values = {}
    if path is not None:
        import yaml
        if not os.path.isfile(path):
            raise UsageError(f"--config {path}: no such file")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"--config {path}: not YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--config {path}: expected a mapping of keys to values")
        for key, value in loaded.items():
            if key not in FIELDS:
                raise UsageError(f"{key}: unknown config key (in {path})")
            values[key] = _coerce(key, value, path)
    for key, value in parse_overrides(overrides):
        if key not in FIELDS:
            raise UsageError(f"{key}: unknown config key (on the command line)")
        values[key] = _coerce(key, value, "command line")
    return validate(VLMPruningConfig(**values))


def validate(config: VLMPruningConfig) -> VLMPruningConfig:
    """Checks across keys: exactly one model source, steps xor epochs, positive sizes and rates."""
    sources = [k for k in ("tiny_random", "base_checkpoint", "model_name_or_path") if getattr(config, k)]
    if len(sources) != 1:
        raise UsageError(f"model: give exactly one of tiny_random, base_checkpoint, model_name_or_path "
                         f"(got {', '.join(sources) or 'none'})")
    if (config.steps is None) == (config.epochs is None):
        raise UsageError("steps / epochs: set exactly one of them (the other null)")
    positive = {"batch_size": config.batch_size, "save_every": config.save_every, "steps": config.steps or 1,
                "epochs": config.epochs or 1, "pruner_d_internal": config.pruner_d_internal,
                "pruner_num_heads": config.pruner_num_heads, "tiny_image_size": config.tiny_image_size,
                "keep_checkpoints": config.keep_checkpoints,
                "lr_merger": config.lr_merger, "lr_pruner": config.lr_pruner,
                "lr_discriminator": config.lr_discriminator, "temperature_min": config.temperature_min}
    for key, value in positive.items():
        if value <= 0:
            raise UsageError(f"{key} {value}: must be positive")
    if config.max_grad_norm is not None and config.max_grad_norm <= 0:
        raise UsageError(f"max_grad_norm {config.max_grad_norm}: must be positive, or null for no clipping")
    if not 0 < config.merge_ratio < 1:
        raise UsageError(f"merge_ratio {config.merge_ratio}: must be between 0 and 1 (exclusive)")
    if config.pruner_keep_ratio is not None and not 0 < config.pruner_keep_ratio <= 1:
        raise UsageError(f"pruner_keep_ratio {config.pruner_keep_ratio}: must be in (0, 1], or null for no budget")
    if not 0 <= config.temperature_anneal_rate <= 1:
        raise UsageError(f"temperature_anneal_rate {config.temperature_anneal_rate}: must be in [0, 1]")
    if config.dataset == "jsonl" and not config.train_jsonl:
        raise UsageError("train_jsonl: required with dataset jsonl")
    return config


def config_from_dict(values: dict, where: str) -> VLMPruningConfig:
    """A config saved in a checkpoint (`to_dict`); UsageError naming `where` for unknown keys."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UsageError(f"{where}: config holds unknown key {unknown[0]!r}")
    return VLMPruningConfig(**{k: _coerce(k, v, where) for k, v in values.items()})
