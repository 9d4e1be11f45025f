"""Tiny random LLaVA built from config, and the model parts the vision-token pruning code reaches into.

No weights are downloaded: `tiny_llava_config` + `build_llava` give a `LlavaForConditionalGeneration` with a
small CLIP vision tower (336 px, patch 14 -> 576 patch tokens) and a LLaMA decoder of 32 layers at hidden 32
(so the default pruning layers [10, 20, 31] are valid), random weights, built in seconds. The same helpers
work on a real `llava-hf/llava-1.5-7b-hf` model. Uses only public transformers 5.x API (5.17 and 5.24).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration


@dataclass(frozen=True)
class LlavaParts:
    """The modules of a LLaVA model the pruning code uses.

    language_model: the decoder model (has `.layers`, `.embed_tokens`, `.norm`, `.rotary_emb`);
    num_layers: its decoder depth L; hidden_size: its width D.
    """
    vision_tower: nn.Module
    projector: nn.Module
    language_model: nn.Module
    lm_head: nn.Module
    num_layers: int
    hidden_size: int


def tiny_llava_config(vocab_size: int, image_token_id: int, pad_token_id: int, num_layers: int = 32,
                      hidden_size: int = 32, vision_hidden_size: int = 32, vision_layers: int = 2,
                      image_size: int = 336, patch_size: int = 14, num_heads: int = 4,
                      intermediate_size: int | None = None, max_position_embeddings: int = 2048) -> LlavaConfig:
    """A small LLaVA-1.5-shaped config: CLIP vision tower ((image_size / patch_size)^2 patch tokens, 576 at the
    defaults) -> 2-layer GELU projector -> LLaMA decoder of `num_layers` layers at `hidden_size`.

    Raises ValueError when `image_token_id` / `pad_token_id` are not ids of the vocabulary or the image size is
    not a multiple of the patch size.
    """
    for name, token in (("image_token_id", image_token_id), ("pad_token_id", pad_token_id)):
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name}={token} is not an id of a vocabulary of {vocab_size}")
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    vision = CLIPVisionConfig(hidden_size=vision_hidden_size, intermediate_size=4 * vision_hidden_size,
                              num_hidden_layers=vision_layers, num_attention_heads=num_heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden_size)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                       intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_heads,
                       max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", pad_token_id=pad_token_id)


def num_image_tokens(config) -> int:
    """Image-token ids per sample of a LlavaConfig: patches of the tower (plus CLS under the "full" select
    strategy)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def build_llava(config: LlavaConfig, dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    """A `LlavaForConditionalGeneration` with random weights from `config`, in `dtype`, eval mode."""
    model = LlavaForConditionalGeneration._from_config(config, dtype=dtype,
                                                       attn_implementation=attn_implementation)
    return model.to(dtype).eval()


def llava_parts(model: LlavaForConditionalGeneration) -> LlavaParts:
    """The vision tower, projector, decoder, LM head, depth and width of a Hugging Face LLaVA model."""
    inner = model.model
    language_model = inner.language_model
    return LlavaParts(vision_tower=inner.vision_tower, projector=inner.multi_modal_projector,
                      language_model=language_model, lm_head=model.lm_head,
                      num_layers=len(language_model.layers), hidden_size=language_model.config.hidden_size)


def image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features [B, N, D] for pixel_values [B, 3, H, W], as LLaVA computes them: the vision
    tower's hidden states at `config.vision_feature_layer` (without the CLS token under the "default" select
    strategy), through the multi-modal projector. N = 576 at 336 px / patch 14; D = the LLM width."""
    parts = llava_parts(model)
    config = model.config
    tower_dtype = next(parts.vision_tower.parameters()).dtype
    out = parts.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True, return_dict=True)
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    selected = [out.hidden_states[layer] for layer in layers]
    if config.vision_feature_select_strategy == "default":
        selected = [hidden[:, 1:] for hidden in selected]
    return parts.projector(torch.cat(selected, dim=-1))


def vision_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """bool [B, S]: True at the image placeholder positions (`input_ids == image_token_id`)."""
    return input_ids == image_token_id


def question_mask(batch: dict, image_token_id: int) -> torch.Tensor:
    """bool [B, S]: the question (prompt text) positions of a collated batch: attended, not an image
    placeholder and, when the batch has labels, not a supervised answer position (label -100)."""
    mask = batch["attention_mask"].bool() & ~vision_positions(batch["input_ids"], image_token_id)
    labels = batch.get("labels")
    if labels is not None:
        mask &= labels == -100
    return mask
