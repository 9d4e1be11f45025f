"""Where the blocks and their query/key projections live in timm and open_clip ViTs.

Anchor pruning (SPEC section 4; EViT, ICLR 2022; Long et al., CVPR 2023) needs,
per block, the pre-attention norm and the q/k rows of the fused in-projection.
Both libraries lay those rows out as [3, heads, head_dim] x dim: timm in
`attn.qkv`, open_clip in `attn.in_proj_weight` / `in_proj_bias` (for
`nn.MultiheadAttention` and for its own `Attention`). Nothing here replaces a
third-party forward: blocks are read, never patched. The attribute layout this
relies on is checked structurally for every block, and versions outside the
tested ranges get a warning.

Tested: timm 1.0.31, 1.0.29 and 0.9.16; open_clip_torch 3.3.0 (batch-first
blocks) and 2.24.0 (sequence-first blocks); torch 2.14 (CPU) and 2.11 (H100).
Expected to hold for timm >= 0.9 and open_clip_torch >= 2.0; other versions
get a warning (SUPPORTED below).
"""
import importlib.metadata
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from packaging.version import Version

from tokens.anchor import Attend, QueryRows, attend_with

SUPPORTED = {"timm": ("0.9", "2"), "open_clip_torch": ("2.0", "4")}


def check_version(distribution: str) -> None:
    low, high = SUPPORTED[distribution]
    try:
        found = Version(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return
    if not Version(low) <= found < Version(high):
        warnings.warn(f"anchor token pruning is tested with {distribution}>={low},<{high}; found {found}. "
                      f"Blocks are wrapped, not patched, but the q/k weight layout it reads may have changed.")


class QKReader:
    """Reads one block's attention scores for chosen query tokens from its own weights, so the
    block itself still runs its fused attention on the pruned sequence."""

    def __init__(self, norm: nn.Module, attn: nn.Module, projection: nn.Module, names: Tuple[str, str],
                 num_heads: int, head_dim: int, scale: float, q_norm: Optional[nn.Module] = None,
                 k_norm: Optional[nn.Module] = None, cosine: bool = False):
        """norm: the pre-attention norm; attn: the attention module; projection.<names[0]> / <names[1]>:
        the fused in-projection weight [3*H*d, D] and bias [3*H*d] (or None), read at every call.
        cosine: open_clip's scaled cosine attention (attn.logit_scale, attn.logit_scale_max).

        Modules are held, never closures over them, so a deepcopy or a pickle of the model carries
        readers that read the copy's own weights (tokens/patching.py)."""
        self.norm, self.attn, self.projection, self.names = norm, attn, projection, tuple(names)
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.q_norm, self.k_norm = (None if isinstance(n, nn.Identity) else n for n in (q_norm, k_norm))
        self.cosine = cosine

    def weights(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The in-projection (weight [3*H*d, D], bias or None) as the module holds it now."""
        return getattr(self.projection, self.names[0]), getattr(self.projection, self.names[1], None)

    def _project(self, h: torch.Tensor, part: int, norm: Optional[nn.Module]) -> torch.Tensor:
        weight, bias = self.weights()
        width = self.num_heads * self.head_dim
        rows = slice(part * width, (part + 1) * width)
        out = F.linear(h, weight[rows], None if bias is None else bias[rows])
        out = out.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        out = norm(out) if norm is not None else out
        return out.contiguous()  # [B, H, N, d]: attention_rows multiplies by it per (sample, head) without a copy

    def _query_rows(self, h: torch.Tensor) -> QueryRows:
        def query_rows(positions: torch.Tensor) -> torch.Tensor:
            picked = h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            return self._project(picked, 0, self.q_norm)
        return query_rows

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, QueryRows]:
        """x [B, N, D] block input -> (keys [B, H, N, d], query_rows(positions [B, R]) -> [B, H, R, d])."""
        h = self.norm(x)
        return self._project(h, 1, self.k_norm), self._query_rows(h)

    def attend(self, x: torch.Tensor) -> Attend:
        """x [B, N, D] block input -> attend(positions [B, R]) = head-mean attention rows [B, R, N].

        Plain q.k attention never builds the keys: q_h . (W_k,h h_n + b_k,h) = (W_k,h^T q_h) . h_n + q_h . b_k,h,
        and the last term is the same for every key n, so the softmax drops it. Folding the R query rows
        into W_k costs H*R*D*d multiply-adds per image instead of N*D^2 for a key projection
        (about 1/16 of it at ViT-B/16 with R = 10 anchors), and no [B, H, N, d] tensor is written.
        Normalised keys (k_norm, open_clip's scaled cosine attention) need the keys themselves.
        """
        if self.k_norm is not None or self.cosine:
            keys, query_rows = self(x)
            return attend_with(keys, query_rows, self.scale, self.logit_scale_value())
        h = self.norm(x)
        query_rows = self._query_rows(h)
        weight, _ = self.weights()
        heads, head_dim = self.num_heads, self.head_dim
        width, dim = heads * head_dim, weight.shape[1]  # attention width H*d may differ from the token width D
        key_weight = weight[width:2 * width].view(heads, head_dim, dim)  # [H, d, D]

        def attend(positions: torch.Tensor) -> torch.Tensor:
            batch, rows = positions.shape
            q = query_rows(positions) * self.scale                                  # [B, H, R, d]
            folded = torch.bmm(q.transpose(0, 1).reshape(heads, batch * rows, head_dim), key_weight)  # [H, B*R, D]
            folded = folded.view(heads, batch, rows, dim).transpose(0, 1).reshape(batch, heads * rows, dim)
            logits = torch.bmm(folded, h.transpose(1, 2))                            # [B, H*R, N]
            return logits.view(batch, heads, rows, -1).softmax(dim=-1, dtype=torch.float32).mean(dim=1)
        return attend

    def tensors(self) -> List[torch.Tensor]:
        """Every parameter the scores are read from (norm, projections, q/k norms, logit scale)."""
        return [*self.norm.parameters(), *self.attn.parameters()]

    def logit_scale_value(self) -> Optional[torch.Tensor]:
        """open_clip's cosine-attention scale [H, 1, 1]: clamped, then exponentiated; None for q.k attention."""
        if not self.cosine:
            return None
        return torch.clamp(self.attn.logit_scale, max=self.attn.logit_scale_max).exp()


@dataclass
class Target:
    """One ViT image encoder as anchor pruning sees it."""
    library: str
    encoder: nn.Module          # the module whose forward encodes images (timing hooks go here)
    blocks: nn.Module           # ModuleList / Sequential of transformer blocks
    readers: List[QKReader]
    num_prefix_tokens: int
    num_tokens: Optional[int]   # None when the image size is only known at run time
    sequence_first: bool        # blocks see [N, B, D] (open_clip before 2.26)


def _timm_reader(block: nn.Module, index: int) -> QKReader:
    from timm.models.vision_transformer import Block
    try:
        from timm.layers import Attention  # timm >= 1.0
    except ImportError:
        from timm.models.vision_transformer import Attention  # timm 0.9
    # exact types: a subclass or another block (ResPostBlock, ParallelScalingBlock) or attention (DiffAttention,
    # AttentionRope) may place its norm or compute its attention differently from what QKReader reads
    if type(block) is not Block or type(getattr(block, "attn", None)) is not Attention:
        raise TypeError(f"block {index} is a {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}; "
                        "anchor pruning supports timm's pre-norm Block with timm.layers.Attention")
    attn = block.attn
    return QKReader(block.norm1, attn, attn.qkv, ("weight", "bias"), attn.num_heads, attn.head_dim,
                    attn.scale, attn.q_norm, attn.k_norm)


def timm_target(model: nn.Module) -> Optional[Target]:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    if not isinstance(model, VisionTransformer):
        return None
    check_version("timm")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("anchor pruning needs a class token; this timm VisionTransformer was built with class_token=False")
    num_tokens = None
    if not getattr(model, "dynamic_img_size", False):
        num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    readers = [_timm_reader(block, i) for i, block in enumerate(model.blocks)]
    return Target("timm", model, model.blocks, readers, model.num_prefix_tokens, num_tokens, False)


IN_PROJ = ("in_proj_weight", "in_proj_bias")  # open_clip / nn.MultiheadAttention fused q/k/v rows


def _open_clip_reader(block: nn.Module, index: int) -> QKReader:
    from open_clip import transformer as oct
    attn = getattr(block, "attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        if attn.in_proj_weight is None:
            raise TypeError(f"block {index}: nn.MultiheadAttention with separate q/k/v weights is not supported")
        head_dim = attn.embed_dim // attn.num_heads
        return QKReader(block.ln_1, attn, attn, IN_PROJ, attn.num_heads, head_dim, head_dim ** -0.5)
    custom = getattr(oct, "Attention", None)
    if custom is not None and isinstance(attn, custom):
        cosine = getattr(attn, "logit_scale", None) is not None
        return QKReader(block.ln_1, attn, attn, IN_PROJ, attn.num_heads, attn.head_dim, attn.scale,
                        getattr(attn, "ln_q", None), getattr(attn, "ln_k", None), cosine)
    raise TypeError(f"block {index}: attention {type(attn).__name__} is not supported "
                    "(expected nn.MultiheadAttention or open_clip.transformer.Attention)")


def open_clip_target(model: nn.Module) -> Optional[Target]:
    try:
        from open_clip import transformer as oct
    except ImportError:
        return None
    visual = model if isinstance(model, oct.VisionTransformer) else getattr(model, "visual", None)
    if visual is None:
        return None
    trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel tower wraps a timm ViT
    if trunk is not None:
        found = timm_target(trunk)
        if found is not None:
            found.encoder = visual
        return found
    if not isinstance(visual, oct.VisionTransformer):
        return None
    check_version("open_clip_torch")
    transformer = visual.transformer
    readers = [_open_clip_reader(block, i) for i, block in enumerate(transformer.resblocks)]
    sequence_first = not getattr(transformer, "batch_first", False)
    num_tokens = visual.positional_embedding.shape[0]
    return Target("open_clip", visual, transformer.resblocks, readers, 1, num_tokens, sequence_first)


# Tried in order; each returns a Target or None. Adding a library is one function and one line.
ADAPTERS = (timm_target, open_clip_target)


def find_target(model: nn.Module) -> Target:
    for adapter in ADAPTERS:
        target = adapter(model)
        if target is not None:
            return target
    raise TypeError(f"anchor pruning supports timm VisionTransformer and open_clip CLIP / VisionTransformer "
                    f"models, got {type(model).__name__}")
