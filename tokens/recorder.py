"""Per-block CLS attention and kept-token records for anchor token pruning (SPEC section 4).

File layout written by `AttentionRecorder.save` (a plain dict; loads with
`torch.load(path, weights_only=True)`), images in evaluation order:

    format            "anchor-token-attention/1"
    meta              dict of str -> int | float | str | bool (k_anchors, top_m, alpha,
                      start_block, num_prefix_tokens, pruning, model, pretrained, ...)
    num_images        int
    blocks            int64 [L]: the recorded block indices (0-based)
    cls_attention     list of L float32 [num_images, N_b]: head-mean softmax attention of the
                      CLS query over the N_b tokens entering block b (each row sums to 1)
    token_positions   list of L int64 [num_images, N_b]: original positions of those tokens
                      (0 = CLS, then prefix tokens, then patches in row-major order)
    kept_positions    list of L int64 [num_images, n_b]: original positions of the tokens block b
                      actually processed (sorted); equal to token_positions where it pruned nothing
    anchor_positions  list of L int64 [num_images, k]: original positions of block b's anchors
                      ([num_images, 0] where the block pruned nothing)
"""
import os
from typing import Dict, List, Optional

import torch


KEYS = ("cls_attention", "token_positions", "kept_positions", "anchor_positions")


class AttentionRecorder:
    """Plain dicts of lists (no lambdas), so a model carrying a recorder can be deep-copied and pickled."""

    def __init__(self):
        self._rows: Dict[int, Dict[str, List[torch.Tensor]]] = {}

    def add(self, block: int, cls_attention: torch.Tensor, positions: torch.Tensor,
            kept: Optional[torch.Tensor], anchors: Optional[torch.Tensor]) -> None:
        rows = self._rows.setdefault(block, {key: [] for key in KEYS})
        batch = positions.shape[0]
        rows["cls_attention"].append(cls_attention.detach().float().cpu())
        rows["token_positions"].append(positions.detach().cpu())
        rows["kept_positions"].append((positions if kept is None else kept).detach().cpu())
        empty = torch.zeros(batch, 0, dtype=torch.long)
        rows["anchor_positions"].append(empty if anchors is None else anchors.detach().cpu())

    @property
    def num_images(self) -> int:
        if not self._rows:
            return 0
        first = self._rows[min(self._rows)]
        return sum(t.shape[0] for t in first["token_positions"])

    def clear(self) -> None:
        self._rows.clear()

    def to_dict(self, meta: Optional[dict] = None) -> dict:
        blocks = sorted(self._rows)
        out = {"format": "anchor-token-attention/1", "meta": dict(meta or {}), "num_images": self.num_images,
               "blocks": torch.tensor(blocks, dtype=torch.long)}
        for key in KEYS:
            out[key] = [torch.cat(self._rows[b][key]) for b in blocks]
        return out

    def save(self, path: str, meta: Optional[dict] = None) -> None:
        """Atomic write: a crash leaves either the old file or the new one, never half of one."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as handle:
            torch.save(self.to_dict(meta), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
