"""Low-rank factorisation of vision features (SPEC §6): feature cache, ResMLP / MLP / AdaLoRA models,
trainer, truncated-SVD / PCA baselines and plots."""
