"""The four losses of the vision-token pruning training (SPEC §5), as pure functions of tensors.

Generator side (merger + layer pruner): task cross-entropy on the answer tokens, merge sparsity and the
adversarial loss (make the discriminator call the pruned run real). Discriminator side: real/fake BCE.
"""
import torch
import torch.nn.functional as F


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the supervised positions: logits [B, S, V] at position t predict
    labels [B, S] at t + 1; positions labelled -100 (prompt, padding, image) are left out. Mean over the
    supervised tokens (float32). Raises ValueError when no position is supervised."""
    targets = labels[:, 1:]
    if not bool((targets != -100).any()):
        raise ValueError("labels: no supervised (answer) position in the batch")
    predictions = logits[:, :-1].float()
    return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), ignore_index=-100)


def merge_sparsity_loss(kept: torch.Tensor, target: float, weight: float) -> torch.Tensor:
    """weight · mean over the batch of (kept − target)², kept float [B] the merger's soft token count."""
    return weight * (kept.float() - float(target)).pow(2).mean()


def pruner_budget_loss(keep: dict, keep_valid: dict, keep_ratio: float, weight: float) -> torch.Tensor:
    """weight · mean over the batch of Σ_l (kept fraction at pruning layer l − keep_ratio)².

    keep {layer: [B, n]} the decider's keep masks (straight-through Gumbel samples in training: hard values,
    soft gradients), keep_valid {layer: bool [B, n]} the vision tokens each decision was over. The fraction is
    over those tokens; a sample with none at a layer adds nothing there. Without such a budget the heads only
    see the task and adversarial losses, which are lowest when every token is kept. Raises ValueError when
    `keep` is empty (no pruning layer ran)."""
    if not keep:
        raise ValueError("pruner_keep_ratio: the pruned forward ran no pruning layer")
    total = None
    for layer, values in keep.items():
        valid = keep_valid[layer].to(values.dtype)
        count = valid.sum(dim=1)
        fraction = (values * valid).sum(dim=1) / count.clamp(min=1)
        term = torch.where(count > 0, (fraction.float() - keep_ratio).pow(2), torch.zeros_like(fraction.float()))
        total = term if total is None else total + term
    return weight * total.mean()


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """BCE of the discriminator's logits [B] on the pruned run against the label real (1): low when the
    pruned hidden states pass for unpruned ones. Gradients flow to the pruned forward."""
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float32))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Mean of the BCE on unpruned runs labelled real (1) and on pruned runs labelled fake (0); logits [B].
    Call it on logits of detached hidden states, so only the discriminator learns from it."""
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float32))
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float32))
    return 0.5 * (real + fake)
