"""Supervised pre-training of a tiny LLaVA's vision side (CLIP tower + projector) on CIFAR-10 labels, before the
whole model learns to answer (`train_tiny_llava.py --vision_pretrain_steps / --vision_pretrain_minutes`).

LLaVA starts from a CLIP tower trained on 400M image-text pairs and keeps it frozen; the tiny LLaVA's tower starts
from random weights, and learning to see only through the language model's answer loss is slow: 7,586 steps of
64 on an H100 left "what is in the picture?" at 46 % and "is there a {class}?" at chance. This stage stands in
for the CLIP pre-training: the projected image features (`vlm.llava.image_features`, the tokens the LLM reads),
mean-pooled over the N vision tokens, go through a linear classifier of the 10 classes, trained with
cross-entropy under random crops (4 px padding) and flips (data.loader.random_crop_flip, the runner's
augmentation); the classifier is then thrown away.
`--freeze_vision` afterwards keeps the tower fixed while the projector and the LLM train (LLaVA-1.5's recipe).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from data.loader import random_crop_flip
from utils.errors import require_finite
from utils.timing import StepBudget
from vlm.data import CIFAR10_CLASSES, clip_pixel_values
from vlm.llava import image_features, llava_parts
from vlm.schedule import warmup_cosine


def labelled_images(samples) -> tuple:
    """(uint8 images [N, 3, H, W], long labels [N]) of the images of CIFAR-10 VQA samples (`cifar10_vqa`: two
    per image, the "what" question first, answered by the class name): the same split the VQA training sees."""
    what = samples[0::2]
    images = torch.stack([sample.image for sample in what])
    labels = torch.tensor([CIFAR10_CLASSES.index(sample.answers[0]) for sample in what])
    return images, labels


class VisionClassifier(nn.Module):
    """The LLaVA's vision side plus a linear head: pixel_values [B, 3, S, S] -> logits [B, classes], from the
    mean over the N projected image features [B, N, D] (`image_features`: tower at `vision_feature_layer`,
    projector)."""

    def __init__(self, llava, classes: int):
        super().__init__()
        self.llava = llava
        self.head = nn.Linear(llava_parts(llava).hidden_size, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(image_features(self.llava, pixel_values).mean(dim=1))


def vision_parameters(llava) -> list:
    """The parameters this stage trains: the vision tower's and the projector's."""
    parts = llava_parts(llava)
    return [*parts.vision_tower.parameters(), *parts.projector.parameters()]


@torch.no_grad()
def classification_accuracy(classifier: VisionClassifier, images: torch.Tensor, labels: torch.Tensor,
                            image_size: int, amp: bool, batch_size: int = 500) -> float:
    """Top-1 accuracy in % of `classifier` on uint8 images [N, 3, H, W] / labels [N] (on its device), no
    augmentation."""
    was_training = classifier.training
    classifier.eval()
    correct = 0
    for begin in range(0, len(labels), batch_size):
        pixels = clip_pixel_values(images[begin:begin + batch_size], image_size)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            correct += int((classifier(pixels).argmax(1) == labels[begin:begin + batch_size]).sum())
    classifier.train(was_training)
    return 100.0 * correct / max(len(labels), 1)


def pretrain_vision(llava, train, val, *, image_size: int, steps: int, minutes: Optional[float], batch_size: int,
                    lr: float, weight_decay: float, warmup: int, seed: int, amp: bool,
                    record: Callable[[dict], None] = lambda r: None, log: Callable[[str], None] = print) -> dict:
    """Train the tower and projector of `llava` (in place, on its device) as a CIFAR-10 classifier.

    train / val: (uint8 images [N, 3, 32, 32], long labels [N]) on any device (moved to the model's). AdamW
    (`lr`, `weight_decay`) with `warmup` linear steps then a cosine to 0 over `steps`; with `minutes`, after 50
    steps the step count is cut to what fits into 85 % of it. bf16 autocast when `amp` (CUDA). `record` gets
    {"type": "vision_pretrain", "step", "loss", "lr"} every 50 steps. The LLM and LM head are left untouched.
    Returns {"steps", "seconds", "epochs_seen", "final_loss", "val_accuracy" (%), "batch_size", "lr"}.
    Raises ValueError for steps or batch_size < 1.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"pretrain_vision: steps ({steps}) and batch_size ({batch_size}) must be positive")
    device = next(llava.parameters()).device
    images, labels = (t.to(device) for t in train)
    val_images, val_labels = (t.to(device) for t in val)
    classifier = VisionClassifier(llava, int(labels.max()) + 1).to(device).train()
    params = [*vision_parameters(llava), *classifier.head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(seed)
    total, step, order, start = steps, 0, torch.empty(0, dtype=torch.long, device=device), time.time()
    budget = StepBudget(minutes, steps, device)
    while step < total:
        if len(order) < batch_size:  # a new epoch: a fresh permutation (the last partial batch is dropped)
            order = torch.randperm(len(labels), device=device, generator=generator)
        index, order = order[:batch_size], order[batch_size:]
        scale = warmup_cosine(step, total, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        pixels = clip_pixel_values(random_crop_flip(images[index], generator), image_size)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(classifier(pixels).float(), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        fitted = budget.after(step)
        if fitted:
            per_step, total = fitted
            log(f"vision pre-training: {per_step * 1000:.1f} ms per step of {batch_size}: {total} steps")
        if step % 50 == 0 or step == total:
            value = require_finite(float(loss.detach()), f"vision pre-training step {step}",
                                   "no tiny_llava.pt written; lower --vision_pretrain_lr")
            record({"type": "vision_pretrain", "step": step, "loss": value, "lr": lr * scale})
    seconds = time.time() - start
    accuracy = classification_accuracy(classifier, val_images, val_labels, image_size, amp)
    log(f"vision pre-training: {step} steps in {seconds:.0f} s, val accuracy {accuracy:.2f}% "
        f"({len(val_labels)} images)")
    return {"steps": step, "seconds": round(seconds, 1), "epochs_seen": round(step * batch_size / len(labels), 3),
            "final_loss": float(loss.detach()), "val_accuracy": accuracy, "batch_size": batch_size, "lr": lr}
