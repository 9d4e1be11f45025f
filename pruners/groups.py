"""Where a ViT's heads and hidden neurons live: attention and MLP layouts found by module structure.

Head/neuron regrouping masks whole groups, so it accepts only layouts it can mask
exactly, and names any other before work starts (UnsupportedLayout):

  attention  any module with `num_heads` and Linear children must have a fused
             `qkv` Linear (rows [3, heads, head_dim]) and a `proj` Linear whose
             inputs are [heads, head_dim]; attention width (heads x head_dim) may
             differ from the embedding width; qk-norm (per head) is fine. Refused:
             separate q/k/v or q/kv projections, a per-feature `gate`, and a norm
             over all heads' outputs (`scale_norm`), which lets a dropped head shift
             the kept ones.
  MLP        `fc1` -> `fc2` (timm Mlp), a packed GLU `fc1` of 2 x hidden rows
             ([value; gate] halves, timm GluMlp, EVA-02's SwiGLU), or separate
             `fc1_g`, `fc1_x` -> `fc2` (timm SwiGLU). Neuron j owns row j of each
             row layer (and row hidden + j of a packed fc1) and column j of fc2.
             Refused: a norm over the hidden features (it mixes neurons).
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch.nn as nn


class UnsupportedLayout(ValueError):
    """A block whose heads or neurons cannot be masked exactly; the message names the module and why."""


@dataclass(frozen=True)
class AttentionGroup:
    qkv: str  # module names
    proj: str
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class MlpGroup:
    rows: Tuple[str, ...]  # layers whose output rows are the hidden features, in packing order
    fc2: str
    hidden: int  # neurons

    @property
    def fc1(self) -> str:
        return self.rows[0]


def _identity(module: Optional[nn.Module]) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _attention_group(name: str, module: nn.Module) -> AttentionGroup:
    kind = f"{name} ({type(module).__name__})"
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        raise UnsupportedLayout(f"{kind} has attention heads but no fused qkv + proj Linear pair "
                                f"(separate q/k/v or q/kv projections are not regrouped)")
    heads, attn_dim = int(module.num_heads), proj.in_features
    head_dim = attn_dim // heads
    if attn_dim % heads or qkv.out_features != 3 * attn_dim or getattr(module, "head_dim", head_dim) != head_dim:
        raise UnsupportedLayout(f"{kind}: qkv has {qkv.out_features} outputs and proj {attn_dim} inputs, "
                                f"not the [3, {heads} heads, head_dim] layout")
    if not _identity(getattr(module, "gate", None)):
        raise UnsupportedLayout(f"{kind}: gated attention (a gate Linear per feature) is not regrouped")
    if not _identity(getattr(module, "norm", None)):
        raise UnsupportedLayout(f"{kind}: a norm over all heads' outputs (scale_norm) mixes heads, "
                                f"so a dropped head would still shift the kept ones")
    others = [child for child, m in module.named_children() if isinstance(m, nn.Linear) and child not in
              ("qkv", "proj")]
    if others:
        raise UnsupportedLayout(f"{kind}: extra projections {others} are not part of the qkv/proj head layout")
    return AttentionGroup(f"{name}.qkv", f"{name}.proj", heads, head_dim)


def find_attention_groups(model: nn.Module) -> List[AttentionGroup]:
    """Every attention module of `model` (modules with `num_heads` and Linear children), in module order.

    Raises UnsupportedLayout for the first one whose heads cannot be masked exactly.
    """
    return [_attention_group(name, module) for name, module in model.named_modules()
            if name and hasattr(module, "num_heads") and any(isinstance(m, nn.Linear) for m in module.children())]


def _mlp_group(name: str, module: nn.Module) -> Optional[MlpGroup]:
    fc2 = getattr(module, "fc2", None)
    if not isinstance(fc2, nn.Linear):
        return None
    hidden = fc2.in_features
    if isinstance(getattr(module, "fc1_g", None), nn.Linear) and isinstance(getattr(module, "fc1_x", None), nn.Linear):
        rows = ("fc1_g", "fc1_x")
    elif isinstance(getattr(module, "fc1", None), nn.Linear):
        rows = ("fc1",)
    else:
        return None
    kind = f"{name} ({type(module).__name__})"
    width = sum(getattr(module, row).out_features for row in rows)
    if width not in (hidden, 2 * hidden) or (len(rows) == 2 and width != 2 * hidden):
        raise UnsupportedLayout(f"{kind}: {'+'.join(rows)} give {width} hidden features and fc2 takes {hidden}; "
                                f"neither an MLP nor a GLU layout")
    if not _identity(getattr(module, "norm", None)):
        raise UnsupportedLayout(f"{kind}: a norm over the hidden features mixes neurons, "
                                f"so a dropped neuron would still shift the kept ones")
    prefix = f"{name}." if name else ""
    return MlpGroup(tuple(prefix + row for row in rows), prefix + "fc2", hidden)


def find_mlp_groups(model: nn.Module) -> List[MlpGroup]:
    """Every MLP of `model` (fc2 fed by fc1, a packed GLU fc1, or fc1_g + fc1_x), in module order.

    Raises UnsupportedLayout for one whose neurons cannot be masked exactly.
    """
    groups = (_mlp_group(name, module) for name, module in model.named_modules())
    return [group for group in groups if group is not None]
