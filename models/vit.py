"""ViTs for 32x32 CIFAR images, built with timm's VisionTransformer.

vit_tiny follows the RSST code's CIFAR definition: patch 4 (64 patches + cls
token), dim 192, depth 9, 3 heads, mlp_ratio 2, qkv bias. vit_small widens it
to dim 384 with 6 heads (head_dim stays 64).
"""
from timm.models.vision_transformer import VisionTransformer

from models import MODELS


def cifar_vit(num_classes: int, embed_dim: int, num_heads: int, depth: int = 9, mlp_ratio: float = 2.0):
    return VisionTransformer(img_size=32, patch_size=4, num_classes=num_classes, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True)


@MODELS.register("vit_tiny")
def vit_tiny(num_classes: int):
    return cifar_vit(num_classes, embed_dim=192, num_heads=3)


@MODELS.register("vit_small")
def vit_small(num_classes: int):
    return cifar_vit(num_classes, embed_dim=384, num_heads=6)
