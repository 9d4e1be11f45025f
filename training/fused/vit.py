"""The grouped route for timm VisionTransformers: N ViTs as one model whose activations hold the cells along
dim 0.

Tokens run as [N, B, T, D]: the patch embedding is one grouped Conv2d (its [B, N*D, h, w] output laid out
cell-major once), every Linear a batched matmul over the cells (`FusedLinear`, stacked), every LayerNorm
normalises each cell's D features with that cell's weight (`FusedLayerNorm`), LayerScale multiplies by each
cell's gamma, and attention runs once over the N*B sequences ([N*B, heads, T, head_dim] views of the qkv
output into `F.scaled_dot_product_attention`, so the fused flash / memory-efficient kernels take all cells at
once, and no activation is transposed or copied between layers). Elementwise ops (GELU, residual adds,
dropout) need no change. Unlike the vmap route this runs the attention in the autocast dtype, and unlike the
streams route it is one stream of large kernels that torch.compile can fuse further.

What differs from N separate runs: the random draws of dropout, DropPath and PatchDropout (each cell and
sample draws its own, from the one generator). Every other number is the one a separate forward computes
(tests/test_fused_vit.py).

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


def cell_view(parameter: torch.Tensor, cells: int, dims: int) -> torch.Tensor:
    """A per-cell vector [N*D] as [N, 1, ..., 1, D], broadcasting against stacked activations of `dims` dims."""
    return parameter.view(cells, *([1] * (dims - 2)), -1)


class FusedLayerNorm(nn.Module):
    """N LayerNorms over D features as one module, weight and bias [N*D] (cell i's at [i*D:(i+1)*D]).
    Stacked activations [N, ..., D] -> [N, ..., D] (each cell's weight), or with `stacked=False` cell-major
    features [..., N*D] -> [..., N*D] (each cell's D features normalised on their own)."""

    def __init__(self, cells: int, norm: nn.LayerNorm, stacked: bool = True):
        super().__init__()
        (self.features,) = norm.normalized_shape
        self.cells, self.eps, self.stacked = cells, norm.eps, stacked
        self.weight = nn.Parameter(torch.empty(cells * self.features)) if norm.elementwise_affine else None
        self.bias = (nn.Parameter(torch.empty(cells * self.features))
                     if norm.elementwise_affine and norm.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # stacked: [N, ..., D], the cells' affine as [N, 1, ..., 1, D]; else a [..., N, D] view, affine [N, D]
        cells = x if self.stacked else x.reshape(*x.shape[:-1], self.cells, self.features)
        dims = cells.dim() if self.stacked else 2
        out = F.layer_norm(cells, (self.features,), eps=self.eps)
        if self.weight is not None and self.bias is not None:  # one kernel
            out = torch.addcmul(cell_view(self.bias, self.cells, dims), out, cell_view(self.weight, self.cells, dims))
        elif self.weight is not None:
            out = out * cell_view(self.weight, self.cells, dims)
        elif self.bias is not None:
            out = out + cell_view(self.bias, self.cells, dims)
        return out if self.stacked else out.reshape(x.shape)


class FusedLayerScale(nn.Module):
    """timm's LayerScale for N cells: x [N, ..., D] * each cell's gamma (stored end to end, [N*D])."""

    def __init__(self, cells: int, scale: nn.Module):
        super().__init__()
        self.cells, self.inplace = cells, getattr(scale, "inplace", False)
        self.gamma = nn.Parameter(scale.gamma.detach().new_empty(cells * scale.gamma.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = cell_view(self.gamma, self.cells, x.dim())
        return x.mul_(gamma) if self.inplace else x * gamma


class FusedDropPath(nn.Module):
    """timm's DropPath (`drop`, kept as is) for stacked activations [N, B, ...]: run over the N*B sequences,
    so each (cell, sample) is kept with probability 1 - drop_prob on its own, as in N separate runs."""

    def __init__(self, drop: nn.Module):
        super().__init__()
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x.flatten(0, 1)).view_as(x)


class FusedAttention(nn.Module):
    """timm's `Attention` for N cells: x [N, B, T, D] -> [N, B, T, D]. `qkv` and `proj` are stacked
    FusedLinears (the cell's parameter names); the N*B sequences go through one scaled_dot_product_attention
    (q, k, v are views of the qkv output) with the cell's 1/sqrt(head_dim) scale and attention dropout."""

    def __init__(self, cells: int, attention: nn.Module):
        super().__init__()
        self.cells, self.num_heads = cells, attention.num_heads
        self.head_dim = attention.qkv.out_features // (3 * self.num_heads)
        self.scale = float(getattr(attention, "scale", self.head_dim ** -0.5))
        self.qkv = fused_linear(attention.qkv, cells, stacked=True)
        self.proj = fused_linear(attention.proj, cells, stacked=True)
        self.attn_drop, self.proj_drop = attention.attn_drop, attention.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                **_) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("fused ViT attention takes no attention mask")
        cells, batch, tokens, features = x.shape
        qkv = self.qkv(x).view(cells * batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [N*B, H, T, d] each
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                             scale=self.scale)
        out = out.transpose(1, 2).reshape(cells, batch, tokens, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(out))


def _vit_types():
    from timm.layers import DropPath, LayerNorm, LayerScale, Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer
    return VisionTransformer, Block, Attention, Mlp, LayerScale, DropPath, (nn.LayerNorm, LayerNorm)


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
        VisionTransformer, Block, Attention, Mlp, LayerScale, _, layer_norms = _vit_types()
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
        _, _, Attention, _, LayerScale, DropPath, layer_norms = _vit_types()
        model = copy.deepcopy(models[0])
        cells, reference = self.cells, model.pos_embed
        for name, module in list(model.named_modules()):
            stacked = not name.startswith("patch_embed.")  # the patch embedding's output is [B, T, N*D]
            if type(module) is Attention:
                wide = FusedAttention(cells, module)
            elif type(module) is nn.Conv2d:
                wide = grouped_conv(module, cells)
            elif type(module) is nn.Linear and not isinstance(model.get_submodule(name.rpartition(".")[0]),
                                                              FusedAttention):
                wide = fused_linear(module, cells, stacked)
            elif type(module) in layer_norms:  # timm's LayerNorm: nn.LayerNorm with an optional fast kernel
                wide = FusedLayerNorm(cells, module, stacked)
            elif type(module) is LayerScale:
                wide = FusedLayerScale(cells, module)
            elif type(module) is DropPath:
                wide = FusedDropPath(module)
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, B, C, H, W] -> logits [N, B, classes]."""
        cells, batch = images.shape[:2]
        m = self.model
        x = m.patch_embed(images.transpose(0, 1).reshape(batch, cells * images.shape[2], *images.shape[3:]))
        x = x.reshape(batch, -1, cells, x.shape[-1] // cells)  # [B, T, N, D] (dynamic_img_size: [B, h, w, N*D])
        if x.shape[1] + 1 != m.pos_embed.shape[1]:
            raise ValueError(f"images of {tuple(images.shape[3:])} give {x.shape[1]} patches; the fused ViT "
                             f"was built for {m.pos_embed.shape[1] - 1}")
        x = torch.cat([m.cls_token[:, None].expand(-1, batch, -1, -1), x.permute(2, 0, 1, 3)], dim=2)
        x = m.pos_drop(x + m.pos_embed[:, None])  # [N, B, T, D]
        if not isinstance(m.patch_drop, nn.Identity):  # timm's PatchDropout takes [B, T, D]: each sequence its own
            x = m.patch_drop(x.flatten(0, 1)).unflatten(0, (cells, batch))
        x = m.norm(m.blocks(m.norm_pre(x)))
        prefix = 0 if getattr(m, "pool_include_prefix", False) else m.num_prefix_tokens
        x = x[:, :, 0] if m.global_pool == "token" else x[:, :, prefix:].mean(dim=2)
        return m.head(m.head_drop(m.fc_norm(x)))  # [N, B, classes]
