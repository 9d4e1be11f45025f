"""Token-level compression for ViT / CLIP image encoders.

Training-free anchor token pruning (SPEC section 4): `select_tokens` scores
tokens per sample (tokens/anchor.py), `apply_pruning_to_model` attaches it to a
timm or open_clip ViT and returns a handle whose `restore()` gives the original
model back (tokens/patching.py); `pruning_handle(model)` gives the handle of a
copied or loaded pruned model.
"""
from tokens.anchor import Selection, check_budget, select_tokens
from tokens.patching import PruningHandle, apply_pruning_to_model, pruning_handle

__all__ = ["Selection", "check_budget", "select_tokens", "PruningHandle", "apply_pruning_to_model", "pruning_handle"]
