"""The frozen backbone, the three trained modules and the numbered checkpoints of train_vlm_pruning.py.

A checkpoint (`checkpoint_<step>.pt`, atomic, weights_only-loadable, sha256 digest) holds the config
(plain dict), the backbone's fingerprint (vocabulary, widths, depths, image tokens: a checkpoint of
another model is refused with one line), the step, the merger / pruner / discriminator weights, the
three optimizers, the RNG state, and for `tiny_random` the backbone weights themselves (a few MB).
"""
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from utils import checkpoint
from utils.errors import CheckpointError, NumericalError, UsageError
from vlm.config import VLMPruningConfig, config_from_dict
from vlm.llava import num_image_tokens
from vlm.pretrain import load_tiny_llava, model_fingerprint

FORMAT = "vlm-pruning/1"
MODULES = ("merger", "pruner", "discriminator")
# keys whose change makes saved modules unusable: a resume with other values is refused
SHAPING_KEYS = ("merger_type", "merge_ratio", "target_merge_tokens", "pruning_layers", "pruner_d_internal",
                "pruner_num_heads", "pruner_type", "discriminator_layers", "discriminator_d_internal",
                "tiny_random", "tiny_image_size", "base_checkpoint", "model_name_or_path")
_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


@dataclass
class Backbone:
    """The frozen LLaVA (eval mode, requires_grad False), its tokenizer (WordTokenizer or the HF tokenizer),
    the collates for training (with answers) and generation prompts, and its image geometry."""
    model: torch.nn.Module
    tokenizer: object
    collate_train: Callable
    collate_prompt: Callable
    num_image_tokens: int
    image_size: int

    @property
    def fingerprint(self) -> dict:
        return model_fingerprint(self.model)


def load_backbone(config: VLMPruningConfig, backbone_state: Optional[dict] = None) -> Backbone:
    """The model named by tiny_random / base_checkpoint / model_name_or_path, frozen. `backbone_state`:
    saved tiny_random weights (a checkpoint's) instead of the seeded random init."""
    from vlm.data import VQACollator, cifar10_vqa_tokenizer
    from vlm.llava import build_llava, tiny_llava_config
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    if config.model_name_or_path:
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        from vlm.tokenizer import HFProcessorCollator
        try:
            model = LlavaForConditionalGeneration.from_pretrained(config.model_name_or_path, dtype=dtype)
            processor = AutoProcessor.from_pretrained(config.model_name_or_path)
        except (OSError, ValueError) as exc:
            raise UsageError(f"model_name_or_path {config.model_name_or_path}: cannot load a LLaVA model "
                             f"({str(exc).splitlines()[0][:160]})") from None
        tokens = num_image_tokens(model.config)
        collates = HFProcessorCollator(processor), HFProcessorCollator(processor, with_answers=False)
        tokenizer = processor.tokenizer
    else:
        if config.base_checkpoint:
            try:
                model, tokenizer, _ = load_tiny_llava(config.base_checkpoint, dtype)
            except CheckpointError as exc:  # its message starts with the path
                raise CheckpointError(f"base_checkpoint {exc}") from None
        else:
            tokenizer = cifar10_vqa_tokenizer()
            torch.manual_seed(config.seed)  # the same random backbone for every run of this seed
            try:
                tiny = tiny_llava_config(len(tokenizer), tokenizer.image_token_id, tokenizer.pad_token_id,
                                         image_size=config.tiny_image_size)
            except ValueError as exc:
                raise UsageError(f"tiny_image_size {config.tiny_image_size}: {exc}") from None
            model = build_llava(tiny)
            if backbone_state is not None:
                model.load_state_dict(backbone_state)
            model = model.to(dtype)
        tokens, size = num_image_tokens(model.config), model.config.vision_config.image_size
        collates = (VQACollator(tokenizer, tokens, size), VQACollator(tokenizer, tokens, size, with_answers=False))
    model.requires_grad_(False)
    return Backbone(model.eval(), tokenizer, collates[0], collates[1], tokens, model.config.vision_config.image_size)


def build_modules(config: VLMPruningConfig, backbone: Backbone) -> Dict[str, torch.nn.Module]:
    """{"merger", "pruner", "discriminator"} for the backbone's width / depth / token count; a config they
    refuse (centres >= tokens, a pruning layer >= depth) -> UsageError naming the key."""
    from vlm.discriminator import Discriminator
    from vlm.layer_pruner import LayerSpecificPruner
    from vlm.llava import llava_parts
    from vlm.merger import LearnableTokenMerger
    parts = llava_parts(backbone.model)
    try:
        return {"merger": LearnableTokenMerger(parts.hidden_size, backbone.num_image_tokens, config.merge_ratio,
                                               config.target_merge_tokens, config.merger_type == "question_aware",
                                               config.pruner_d_internal, config.pruner_num_heads,
                                               config.merge_positions, config.merge_assignment,
                                               config.merge_similarity),
                "pruner": LayerSpecificPruner(parts.hidden_size, parts.num_layers, config.pruning_layers,
                                              config.pruner_type, config.pruner_d_internal, config.pruner_num_heads,
                                              config.pruner_keep_ratio),
                "discriminator": Discriminator(parts.hidden_size, config.discriminator_layers,
                                               config.discriminator_d_internal)}
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"checkpoint_{step:07d}.pt")


def numbered_checkpoints(directory: str) -> List[str]:
    """checkpoint_<step>.pt files of `directory`, newest (highest step) first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(directory) for m in [_NAME.match(name)] if m]
    return [os.path.join(directory, name) for _, name in sorted(found, reverse=True)]


def _cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(path: str, config: VLMPruningConfig, backbone: Backbone, modules: dict, optimizers: dict,
                    step: int, rng: dict, extra: Optional[dict] = None) -> None:
    states = {name: _cpu_state(m) for name, m in modules.items()}
    bad = _non_finite(states)
    if bad:  # the trainer never applies a non-finite step; this is the last line of defence
        raise NumericalError(f"step {step}: non-finite weights in {', '.join(bad[:3])}; {path} not written")
    payload = {"format": FORMAT, "config": config.to_dict(), "fingerprint": backbone.fingerprint, "step": step,
               "modules": states,
               "optimizers": {name: o.state_dict() for name, o in optimizers.items()}, "rng": rng,
               "extra": extra or {}}
    if config.tiny_random:
        payload["backbone"] = _cpu_state(backbone.model)
    checkpoint.save(path, payload)


def load_checkpoint(path: str) -> dict:
    """A validated checkpoint payload; CheckpointError (one line naming `path`) otherwise."""
    payload = checkpoint.load_file(path)
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a train_vlm_pruning.py checkpoint (format {payload.get('format')!r})")
    missing = [k for k in ("config", "fingerprint", "step", "modules", "optimizers", "rng") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return payload


def check_same_model(path: str, payload: dict, fingerprint: dict) -> None:
    """CheckpointError naming the first fingerprint entry where the checkpoint's model differs from ours."""
    saved = payload["fingerprint"]
    for key in sorted(set(saved) | set(fingerprint)):
        if saved.get(key) != fingerprint.get(key):
            raise CheckpointError(f"{path}: checkpoint of another model ({key} {saved.get(key)}, this model "
                                  f"{fingerprint.get(key)})")


def _non_finite(states: dict) -> List[str]:
    """`module.key` of the non-finite floating-point tensors in {module: state_dict}."""
    return checkpoint.non_finite_tensors((f"{name}.{key}", value) for name, state in states.items()
                                         for key, value in state.items())


def load_modules(path: str, payload: dict, modules: dict) -> None:
    """Load the merger, pruner and discriminator weights of a checkpoint payload into `modules`. CheckpointError
    (one line naming `path`) when they do not fit this config or hold a NaN / infinity (a diverged run's)."""
    bad = _non_finite({name: payload["modules"].get(name, {}) for name in MODULES})
    if bad:
        raise CheckpointError(f"{path}: non-finite weights in {', '.join(bad[:3])}"
                              f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} (the training diverged)")
    for name in MODULES:
        try:
            modules[name].load_state_dict(payload["modules"][name])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: {name} weights do not fit this config "
                                  f"({str(exc).splitlines()[0][:160]})") from None


def load_trained(path: str):
    """(backbone, merger, decider, pruning_layers, temperature) of a training checkpoint, merger and decider in
    eval mode; temperature: the merger's temperature the training had reached, saved with it (temperature_min
    for checkpoints without it). CheckpointError (one line naming the file) for a foreign or mismatched one."""
    payload = load_checkpoint(path)
    config = config_from_dict(payload["config"], path)
    backbone = load_backbone(config, payload.get("backbone"))
    check_same_model(path, payload, backbone.fingerprint)
    modules = build_modules(config, backbone)
    load_modules(path, payload, modules)
    temperature = float(payload.get("extra", {}).get("temperature", config.temperature_min))
    return backbone, modules["merger"].eval(), modules["pruner"].eval(), tuple(config.pruning_layers), temperature


def load_for_eval(path: str):
    """(model, tokenizer, merger, decider, pruning_layers) of a training checkpoint, in eval mode."""
    backbone, merger, decider, layers, _ = load_trained(path)
    return backbone.model, backbone.tokenizer, merger, decider, layers
