"""The grouped route for timm VisionTransformers: N ViTs as one model of N-times-wide tokens.

Activations run as [B, T, N*D] (cell-major features, as the grouped CNN route's channels): the patch
embedding is one grouped Conv2d, every Linear a batched matmul (`FusedLinear`), every LayerNorm normalises
each cell's D features on their own (`FusedLayerNorm`), LayerScale multiplies by the N cells' gammas laid
end to end, and attention runs once over the N*B sequences ([N*B, heads, T, head_dim] into
`F.scaled_dot_product_attention`, so the fused flash / memory-efficient kernels take all cells at once).
Elementwise ops (GELU, residual adds, dropout) need no change. Unlike the vmap route this runs the
attention in the autocast dtype, and unlike the streams route it is one stream of large kernels that
torch.compile can fuse further.

What differs from N separate runs: the random draws of dropout and DropPath (DropPath drops sample b in
every cell at once; each cell still drops a sample with probability p). Every other number is the one a
separate forward computes (tests/test_fused_vit.py).

Supported: timm's `VisionTransformer` with a class token (no register tokens), position embeddings added
after the class token is joined (`no_embed_class=False`), `global_pool` "token" or "avg", no attention
pooling, and timm's plain `Attention` (no q/k norm, no gate). `GroupedViTFusedModel.refusal` names what
else a model has.
"""
import copy
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.fused.models import FusedModel, fused_linear, grouped_conv


class FusedLayerNorm(nn.Module):
    """N LayerNorms over D features as one module: [..., N*D] -> [..., N*D], each cell's D features
    normalised on their own; weight and bias [N*D] (cell i's at [i*D:(i+1)*D])."""

    def __init__(self, cells: int, norm: nn.LayerNorm):
        super().__init__()
        (self.features,) = norm.normalized_shape
        self.cells, self.eps = cells, norm.eps
        self.weight = nn.Parameter(torch.empty(cells * self.features)) if norm.elementwise_affine else None
        self.bias = (nn.Parameter(torch.empty(cells * self.features))
                     if norm.elementwise_affine and norm.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = F.layer_norm(x.reshape(*lead, self.cells, self.features), (self.features,), eps=self.eps)
        out = out.reshape(*lead, self.cells * self.features)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out


class FusedAttention(nn.Module):
    """timm's `Attention` for N cells: x [B, T, N*D] -> [B, T, N*D]. `qkv` and `proj` are FusedLinears
    (the cell's parameter names); the N*B sequences go through one scaled_dot_product_attention with
    the cell's 1/sqrt(head_dim) scale and attention dropout."""

    def __init__(self, cells: int, attention: nn.Module):
        super().__init__()
        self.cells, self.num_heads = cells, attention.num_heads
        self.head_dim = attention.qkv.out_features // (3 * self.num_heads)
        self.scale = float(getattr(attention, "scale", self.head_dim ** -0.5))
        self.qkv = fused_linear(attention.qkv, cells)
        self.proj = fused_linear(attention.proj, cells)
        self.attn_drop, self.proj_drop = attention.attn_drop, attention.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                **_) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("fused ViT attention takes no attention mask")
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).view(batch, tokens, self.cells, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 2, 0, 4, 1, 5).reshape(3, self.cells * batch, self.num_heads, tokens,
                                                       self.head_dim).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                             scale=self.scale)
        # [N*B, H, T, d] -> [B, T, N, H, d] -> cell-major features
        out = out.view(self.cells, batch, self.num_heads, tokens, self.head_dim).permute(1, 3, 0, 2, 4)
        return self.proj_drop(self.proj(out.reshape(batch, tokens, -1)))


def _widen_layer_scale(scale: nn.Module, cells: int) -> nn.Module:
    wide = copy.deepcopy(scale)  # same forward (x * gamma), gamma [N*D]
    wide.gamma = nn.Parameter(scale.gamma.detach().new_empty(cells * scale.gamma.shape[0]))
    return wide


def _vit_types():
    from timm.layers import LayerNorm, LayerScale, Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer
    return VisionTransformer, Block, Attention, Mlp, LayerScale, (nn.LayerNorm, LayerNorm)


def _identity(module: Optional[nn.Module]) -> bool:
    return module is None or isinstance(module, nn.Identity)


class GroupedViTFusedModel(FusedModel):
    """The grouped route for timm ViTs (module docstring): images [N, B, C, H, W] -> logits [N, B, classes].
    `cls_token` / `pos_embed` are stored stacked [N, 1, D] / [N, T, D]; every other tensor as the grouped CNN
    route stores it (conv [N*out, ...], Linear [N, out, in], LayerNorm and LayerScale [N*D])."""
    route = "grouped"

    @staticmethod
    def claims(model: nn.Module) -> bool:
        return isinstance(model, _vit_types()[0])

    @staticmethod
    def refusal(model: nn.Module) -> Optional[str]:
        VisionTransformer, Block, Attention, Mlp, LayerScale, layer_norms = _vit_types()
        if not isinstance(model, VisionTransformer):
            return f"{type(model).__name__} is not a timm VisionTransformer"
        unsupported = []
        for missing, what in ((model.cls_token is None, "no class token"), (model.pos_embed is None, "no pos_embed"),
                              (getattr(model, "reg_token", None) is not None, "register tokens")):
            if missing:
                unsupported.append(what)
        if getattr(model, "no_embed_class", False):
            unsupported.append("no_embed_class")
        if model.global_pool not in ("token", "avg") or getattr(model, "attn_pool", None) is not None:
            unsupported.append(f"global_pool {model.global_pool!r}")
        for index, block in enumerate(model.blocks):  # their forwards must be timm's plain ones
            for name, part, kind in (("", block, Block), (".attn", getattr(block, "attn", None), Attention),
                                     (".mlp", getattr(block, "mlp", None), Mlp)):
                if type(part) is not kind:
                    unsupported.append(f"blocks.{index}{name} ({type(part).__name__})")
            attention = getattr(block, "attn", None)
            if type(attention) is Attention and (getattr(attention, "gate", None) is not None or not all(
                    _identity(getattr(attention, part, None)) for part in ("q_norm", "k_norm", "norm"))):
                unsupported.append(f"blocks.{index}.attn (q/k norm or gate)")
        allowed = (nn.Conv2d, nn.Linear, LayerScale, VisionTransformer, *layer_norms)
        unsupported += [f"{name} ({type(module).__name__})" for name, module in model.named_modules()
                        if any(True for _ in module.parameters(recurse=False)) and type(module) not in allowed]
        return (f"grouped ViT fusion takes timm's plain ViT; this one differs in: {'; '.join(unsupported[:3])}"
                if unsupported else None)

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__(models)
        reason = self.refusal(models[0])
        if reason:
            raise ValueError(f"{reason}; use route='streams'")
        _, _, Attention, _, LayerScale, layer_norms = _vit_types()
        model = copy.deepcopy(models[0])
        cells, reference = self.cells, model.pos_embed
        for name, module in list(model.named_modules()):
            if type(module) is Attention:
                wide = FusedAttention(cells, module)
            elif type(module) is nn.Conv2d:
                wide = grouped_conv(module, cells)
            elif type(module) is nn.Linear and not isinstance(model.get_submodule(name.rpartition(".")[0]),
                                                              FusedAttention):
                wide = fused_linear(module, cells)
            elif type(module) in layer_norms:  # timm's LayerNorm: nn.LayerNorm with an optional fast kernel
                wide = FusedLayerNorm(cells, module)
            elif type(module) is LayerScale:
                wide = _widen_layer_scale(module, cells)
            else:
                continue
            model.set_submodule(name, wide.to(reference.device, reference.dtype))
        for name in ("cls_token", "pos_embed"):
            cell = getattr(model, name)
            setattr(model, name, nn.Parameter(cell.detach().new_empty(cells * cell.shape[0], *cell.shape[1:])))
        self.model = model
        self.load_cells([m.state_dict() for m in models])

    def _fused_tensors(self) -> Dict[str, torch.Tensor]:
        return dict(self.model.state_dict(keep_vars=True))

    def _cell_major(self, stacked: torch.Tensor) -> torch.Tensor:
        """[N, T, D] -> [1, T, N*D]."""
        return stacked.permute(1, 0, 2).reshape(1, stacked.shape[1], -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, B, C, H, W] -> logits [N, B, classes]."""
        cells, batch = images.shape[:2]
        m = self.model
        x = m.patch_embed(images.transpose(0, 1).reshape(batch, cells * images.shape[2], *images.shape[3:]))
        x = x.reshape(batch, -1, x.shape[-1])  # [B, T, N*D] (dynamic_img_size models return [B, h, w, N*D])
        if x.shape[1] + 1 != m.pos_embed.shape[1]:
            raise ValueError(f"images of {tuple(images.shape[3:])} give {x.shape[1]} patches; the fused ViT "
                             f"was built for {m.pos_embed.shape[1] - 1}")
        x = torch.cat([self._cell_major(m.cls_token).expand(batch, -1, -1), x], dim=1)
        x = m.pos_drop(x + self._cell_major(m.pos_embed))
        x = m.norm_pre(m.patch_drop(x))
        x = m.norm(m.blocks(x))
        prefix = 0 if getattr(m, "pool_include_prefix", False) else m.num_prefix_tokens
        x = x[:, 0] if m.global_pool == "token" else x[:, prefix:].mean(dim=1)
        logits = m.head(m.head_drop(m.fc_norm(x)))  # [B, N*classes]
        return logits.view(batch, cells, -1).transpose(0, 1)
