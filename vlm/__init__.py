"""Learnable vision-token pruning for LLaVA-style models (SPEC §5): token merger, layer-wise pruner heads,
discriminator, training and origin / soft / hard evaluation on Hugging Face transformers."""
