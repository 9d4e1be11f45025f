"""Vision encoders that turn images into per-image token features [N tokens, D] for the feature cache.

`--encoder` forms (`build_encoder(spec, ...)`):
    timm:NAME or NAME      any timm model (ViTs give [prefix + patches, D]; CNN maps [D, H, W] become
                           [H W, D]); random weights unless `pretrained` (needs the weights locally)
    runner:CHECKPOINT      a checkpoint of this project's runner (main_imp_fillback.py): the model is
                           rebuilt from its config (arch, dataset; the factorised layers of --struct
                           lowrank, the token merger of --struct merge, set to the checkpoint's round:
                           its [1 + centres, D] tokens), its weights loaded and its masks applied;
                           vit_tiny on CIFAR-10 gives [65, 192] (class token + 8 x 8 patches)
    hf:PATH                a Hugging Face vision tower saved at PATH: CLIPVisionModel (or a whole CLIP
                           model: its vision part; last_hidden_state [1 + P, D]) or Qwen2.5-VL's vision
                           tower (a whole Qwen2.5-VL checkpoint: only `visual.*` is loaded; the merged
                           tokens, [256, 2048] for the 3B model at 448 px)
Each Encoder resizes and normalises uint8 images itself; `name` and `config` go to the cache's index so
that a resume with another encoder is refused.
"""
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from utils.errors import CheckpointError, UsageError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Encoder:
    """`encode(images uint8 [B, 3, H, W]) -> float32 [B, N, D]`; `image_size` is the side it resizes to."""
    name: str
    config: Dict
    image_size: int
    forward: Callable[[torch.Tensor], torch.Tensor]
    mean: Tuple[float, ...] = (0.5, 0.5, 0.5)
    std: Tuple[float, ...] = (0.5, 0.5, 0.5)
    normalise: bool = True  # False: `forward` takes the uint8 images as they are (it preprocesses)
    device: str = "cpu"
    modules: list = field(default_factory=list)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if not self.normalise:
            return self.forward(images).float()
        x = images.to(self.device).float().div(255)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.mean, device=x.device)[:, None, None]
        std = torch.tensor(self.std, device=x.device)[:, None, None]
        return self.forward((x - mean) / std).float()


def as_tokens(features: torch.Tensor) -> torch.Tensor:
    """timm forward_features output as tokens: [B, N, D] stays, a CNN map [B, D, H, W] becomes [B, H W, D]."""
    if features.dim() == 4:
        return features.flatten(2).transpose(1, 2)
    if features.dim() != 3:
        raise UsageError(f"--encoder: forward_features gave shape {list(features.shape)}, expected [B, N, D]")
    return features


def timm_encoder(name: str, pretrained: bool = False, img_size: Optional[int] = None, device: str = "cpu") -> Encoder:
    import timm
    if not timm.is_model(name):
        raise UsageError(f"--encoder {name}: not a timm model name (nor runner:PATH, hf:PATH)")
    kwargs = {} if img_size is None else {"img_size": img_size}
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as exc:  # offline hub, missing weights, a model without img_size
        raise UsageError(f"--encoder {name}: timm could not build it ({str(exc).splitlines()[0][:160]})") from None
    model = model.to(device).eval()
    cfg = model.pretrained_cfg
    size = img_size or cfg["input_size"][-1]
    return Encoder(name=f"timm:{name}", config={"pretrained": pretrained, "img_size": size}, image_size=size,
                   forward=lambda x: as_tokens(model.forward_features(x)), mean=tuple(cfg.get("mean", CLIP_MEAN)),
                   std=tuple(cfg.get("std", CLIP_STD)), device=device, modules=[model])


def runner_encoder(path: str, device: str = "cpu") -> Encoder:
    """The trained model of a runner checkpoint, masks applied, at its dataset's size and normalisation.
    Raises UsageError (CheckpointError) naming the file for an unreadable checkpoint, weights that do
    not fit its --arch and a model without forward_features (the CIFAR ResNets)."""
    from data import DATASETS
    from models import create_model
    from pruners import create_struct
    from pruners.reshaping import ShapeChangingMode
    from utils import checkpoint
    from utils.config import RunConfig
    try:
        payload = checkpoint.load(path)
    except CheckpointError as exc:  # its message starts with the path
        raise CheckpointError(f"--encoder runner:{exc}") from None
    arch, dataset = payload["config"]["arch"], payload["config"]["dataset"]
    spec = DATASETS[dataset]
    model = create_model(arch, spec.num_classes)
    struct = create_struct(RunConfig.from_dict(payload["config"]))
    reshaped = isinstance(struct, ShapeChangingMode)
    if reshaped:  # --struct lowrank / merge: the checkpoint's layers (factorised layers, merger) first
        struct.check_model(model)  # what the mode reads off the model (e.g. the patch count merge budgets from)
        struct.shape_model(model, payload["model"])
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise UsageError(f"--encoder runner:{path}: its weights do not fit --arch {arch} "
                         f"({str(exc).splitlines()[0][:160]})") from None
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in payload["masks"].items():
            parameters[name].mul_(mask.to(parameters[name].dtype))
    if reshaped:  # run as in the checkpoint's round (--struct merge: its centres and temperature)
        struct.configure_model(model, payload["round"], log=lambda message: None)
        struct.stop_measuring()
    if not hasattr(model, "forward_features"):
        raise UsageError(f"--encoder runner:{path}: --arch {arch} has no forward_features (use a ViT checkpoint)")
    model = model.to(device).eval()
    return Encoder(name=f"runner:{os.path.abspath(path)}",
                   config={"arch": arch, "trained_on": dataset, "round": payload["round"], "epoch": payload["epoch"],
                           "sha256": checkpoint.sha256_of(path)},
                   image_size=32, forward=lambda x: as_tokens(model.forward_features(x)), mean=spec.mean,
                   std=spec.std, device=device, modules=[model])


def _hf_config(path: str):
    from transformers import AutoConfig
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--encoder hf:{path}: no config.json there (a save_pretrained folder is expected)")
    return AutoConfig.from_pretrained(path)


def _preprocessor_stats(path: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    config = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(config):
        with open(config) as f:
            saved = json.load(f)
        return tuple(saved.get("image_mean", CLIP_MEAN)), tuple(saved.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def _qwen_tower(path: str, config):
    """Qwen2.5-VL's vision tower from a folder holding either the tower alone or a whole model."""
    from safetensors import safe_open
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    if config.model_type == "qwen2_5_vl_vision":
        return Qwen2_5_VisionTransformerPretrainedModel.from_pretrained(path)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
    state = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                for prefix in ("model.visual.", "visual."):
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key)
    missing = sorted(set(tower.state_dict()) - set(state))
    if missing:
        raise UsageError(f"--encoder hf:{path}: the checkpoint lacks vision-tower weights ({missing[:2]})")
    tower.load_state_dict(state)
    return tower


def hf_encoder(path: str, img_size: Optional[int] = None, device: str = "cpu") -> Encoder:
    config = _hf_config(path)
    if config.model_type in ("clip", "clip_vision_model"):
        from transformers import CLIPVisionModel
        model = CLIPVisionModel.from_pretrained(path).to(device).eval()
        size = img_size or model.config.image_size
        mean, std = _preprocessor_stats(path)
        return Encoder(name=f"hf:{os.path.abspath(path)}", config={"model_type": config.model_type, "img_size": size},
                       image_size=size, forward=lambda x: model(pixel_values=x).last_hidden_state,
                       mean=mean, std=std, device=device, modules=[model])
    if config.model_type in ("qwen2_5_vl", "qwen2_5_vl_vision"):
        from transformers import Qwen2VLImageProcessor
        tower = _qwen_tower(path, config).to(device).eval()
        size = img_size or 448
        pixels = {"shortest_edge": size * size, "longest_edge": size * size}  # every image exactly size x size
        saved = os.path.isfile(os.path.join(path, "preprocessor_config.json"))
        processor = (Qwen2VLImageProcessor.from_pretrained(path, size=pixels) if saved
                     else Qwen2VLImageProcessor(size=pixels))

        def forward(images: torch.Tensor) -> torch.Tensor:
            if images.shape[-2:] != (size, size):
                images = F.interpolate(images.float(), size=(size, size), mode="bilinear",
                                       align_corners=False).round().clamp(0, 255).to(torch.uint8)
            inputs = processor(images=list(images.cpu()), return_tensors="pt")
            out = tower(inputs["pixel_values"].to(device, tower.dtype), grid_thw=inputs["image_grid_thw"].to(device))
            merged = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers < 5 / >= 5
            return merged.reshape(images.shape[0], -1, merged.shape[-1])
        return Encoder(name=f"hf:{os.path.abspath(path)}", config={"model_type": config.model_type, "img_size": size},
                       image_size=size, forward=forward, normalise=False, device=device, modules=[tower])
    raise UsageError(f"--encoder hf:{path}: model type {config.model_type!r} is not supported "
                     f"(clip, clip_vision_model, qwen2_5_vl, qwen2_5_vl_vision)")


def build_encoder(spec: str, pretrained: bool = False, img_size: Optional[int] = None, device: str = "cpu") -> Encoder:
    """The encoder named by `spec` (see the module docstring); UsageError naming --encoder when unusable."""
    if spec.startswith("runner:"):
        return runner_encoder(spec[len("runner:"):], device)
    if spec.startswith("hf:"):
        path = spec[len("hf:"):]
        if not os.path.isdir(path):
            raise UsageError(f"--encoder {spec}: no such directory")
        return hf_encoder(path, img_size, device)
    return timm_encoder(spec[len("timm:"):] if spec.startswith("timm:") else spec, pretrained, img_size, device)
