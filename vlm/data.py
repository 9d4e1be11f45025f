"""VQA data for the VLM: a JSONL reader, VQA accuracy, a CIFAR-10 VQA set, images and batches.

The batch format is the one of the vlm contract (LEFT padding, the image placeholder expanded to
N image-token ids, labels only on the answer tokens and the EOS after them). Answer normalisation
(`normalize_answer`) is kept simple: lower case, punctuation removed, the articles a / an / the
dropped, number words zero..ten written as digits, whitespace collapsed.
"""
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from utils.errors import UsageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
WHAT_QUESTION = "what is in the picture?"
IS_THERE_QUESTION = "is there a {}?"
GENERATED_ANSWER_COPIES = 10  # VQAv2 holds 10 human answers: one answer 10 times scores 1 when matched


@dataclass(frozen=True)
class VQASample:
    """One question about one image: `image` is a file path or a uint8 tensor [3, H, W];
    `answers` are the reference answers (repeats count as agreeing annotators)."""
    image: Union[str, torch.Tensor]
    question: str
    answers: tuple


# ---------------------------------------------------------------- reader and metrics
def read_vqa_jsonl(path: str) -> List[VQASample]:
    """Samples of a JSONL file, one object per line: {"image": path (relative to the file's folder),
    "question": str, "answers": [str, ...]} ("answer": str is read as one answer). Raises UsageError
    naming the file and line for a missing file, bad JSON or a missing/ill-typed field."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such VQA JSONL file")
    folder, samples = os.path.dirname(os.path.abspath(path)), []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: not JSON ({exc.msg})") from None
            answers = None
            if isinstance(record, dict):
                answers = record.get("answers", [record["answer"]] if "answer" in record else None)
            if not isinstance(record, dict) or not isinstance(record.get("image"), str) \
                    or not isinstance(record.get("question"), str) or not isinstance(answers, list) \
                    or not answers or not all(isinstance(a, str) for a in answers):
                raise UsageError(f"{where}: needs \"image\" (str), \"question\" (str) and \"answers\" "
                                 f"(non-empty list of str)")
            samples.append(VQASample(os.path.join(folder, record["image"]), record["question"], tuple(answers)))
    if not samples:
        raise UsageError(f"{path}: holds no VQA samples")
    return samples


_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_answer(answer: str) -> str:
    words = _PUNCTUATION.sub(" ", answer.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy: min(#reference answers equal to the prediction / 3, 1), after normalisation."""
    wanted = normalize_answer(prediction)
    return min(sum(normalize_answer(a) == wanted for a in answers) / 3.0, 1.0)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the most frequent reference answer (ties: the first)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return float(normalize_answer(prediction) == counts.most_common(1)[0][0])


# ---------------------------------------------------------------- CIFAR-10 VQA
def cifar10_vqa(images: torch.Tensor, labels: torch.Tensor, seed: int) -> List[VQASample]:
    """Two questions per image: "what is in the picture?" (answer: the class name) and "is there a
    {class}?" — "yes" (the image's class) for exactly half of the images, chosen by a permutation
    drawn from `seed`, "no" (a uniformly drawn other class) for the rest. images uint8 [N, 3, H, W],
    labels long [N]. Deterministic by `seed`; samples come image by image, the "what" question first."""
    generator = torch.Generator().manual_seed(seed)
    count = len(labels)
    yes = torch.zeros(count, dtype=torch.bool)
    yes[torch.randperm(count, generator=generator)[:count // 2]] = True
    offsets = torch.randint(1, len(CIFAR10_CLASSES), (count,), generator=generator)
    samples = []
    for i in range(count):
        label = int(labels[i])
        asked = label if yes[i] else (label + int(offsets[i])) % len(CIFAR10_CLASSES)
        samples.append(VQASample(images[i], WHAT_QUESTION, (CIFAR10_CLASSES[label],) * GENERATED_ANSWER_COPIES))
        samples.append(VQASample(images[i], IS_THERE_QUESTION.format(CIFAR10_CLASSES[asked]),
                                 ("yes" if yes[i] else "no",) * GENERATED_ANSWER_COPIES))
    return samples


def cifar10_vqa_splits(root: str, seed: int, train_images: int, val_images: int):
    """(train, val, test) CIFAR-10 VQA samples from the cifar-10-batches-py folder under `root`
    (materialise it from the ../shared/data bundle): train from the first `train_images` training
    images, val from the last `val_images` (held out), test from the 10,000 test images."""
    from data import load
    splits = load("cifar10", root, val_images)
    if not 0 < train_images <= len(splits.train):
        raise UsageError(f"train_images {train_images}: must be between 1 and {len(splits.train)}")
    return (cifar10_vqa(splits.train.images[:train_images], splits.train.labels[:train_images], seed),
            cifar10_vqa(splits.val.images, splits.val.labels, seed + 1),
            cifar10_vqa(splits.test.images, splits.test.labels, seed + 2))


# ---------------------------------------------------------------- images and batches
def load_image(image: Union[str, torch.Tensor]) -> torch.Tensor:
    """uint8 [3, H, W] of a tensor or an image file (RGB); UsageError naming an unreadable file."""
    if isinstance(image, torch.Tensor):
        return image
    try:
        from PIL import Image
        import numpy as np
        with Image.open(image) as picture:
            return torch.from_numpy(np.asarray(picture.convert("RGB")).copy()).permute(2, 0, 1)
    except OSError as exc:
        raise UsageError(f"{image}: not a readable image ({exc})") from None


def clip_pixel_values(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """uint8 [3, H, W] images (any sizes, any device) -> float [B, 3, size, size]: bicubic resize to the
    tower's square input, then CLIP mean/std normalisation."""
    if len({tuple(img.shape) for img in images}) == 1:  # one call for a batch of equal sizes
        pixels = F.interpolate(torch.stack(list(images)).float(), size=(size, size), mode="bicubic",
                               align_corners=False)
    else:
        pixels = torch.cat([F.interpolate(img.unsqueeze(0).float(), size=(size, size), mode="bicubic",
                                          align_corners=False) for img in images])
    pixels = pixels.clamp_(0, 255).div_(255)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def left_padded(prompts: Sequence[Sequence[int]], answers: Optional[Sequence[Sequence[int]]],
                pad_token_id: int) -> dict:
    """input_ids / attention_mask (long [B, S]) of prompt (+ answer) ids, LEFT-padded with
    `pad_token_id`; with `answers`, also labels (long [B, S]): -100 everywhere except the answer ids."""
    rows = [list(p) + list(a) for p, a in zip(prompts, answers)] if answers is not None else [list(p) for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long) if answers is not None else None
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
        if answers is not None and answers[i]:
            labels[i, width - len(answers[i]):] = torch.tensor(list(answers[i]))
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        batch["labels"] = labels
    return batch


def training_answer(sample: VQASample) -> str:
    """The answer a model is trained to give: the most frequent reference answer (ties: the first)."""
    return Counter(sample.answers).most_common(1)[0][0]


class VQACollator:
    """Batches of VQASample for the tiny LLaVA and its word tokenizer.

    Sequence: bos, `num_image_tokens` image ids, the question's words, then (with_answers) the answer's
    words and eos — the labels cover those last. Without answers the batch ends after the question
    (a generation prompt). pixel_values: `clip_pixel_values(images, image_size)` (with `raw_images`: the
    uint8 `images` [B, 3, h, w] instead, which `batch_to` turns into pixel_values on the device);
    `answers`: the reference answers of each sample (list[list[str]]).
    """

    def __init__(self, tokenizer, num_image_tokens: int, image_size: int, with_answers: bool = True,
                 raw_images: bool = False):
        self.tokenizer, self.num_image_tokens = tokenizer, num_image_tokens
        self.image_size, self.with_answers, self.raw_images = image_size, with_answers, raw_images

    def __call__(self, samples: Sequence[VQASample]) -> dict:
        t = self.tokenizer
        prompts = [[t.bos_token_id] + [t.image_token_id] * self.num_image_tokens + t.encode(s.question)
                   for s in samples]
        answers = [t.encode(training_answer(s)) + [t.eos_token_id] for s in samples] if self.with_answers else None
        batch = left_padded(prompts, answers, t.pad_token_id)
        images = [load_image(s.image) for s in samples]
        if self.raw_images:  # same-size uint8 images, resized on the device by batch_to (fast on a GPU)
            batch["images"] = torch.stack(images)
        else:
            batch["pixel_values"] = clip_pixel_values(images, self.image_size)
        batch["answers"] = [list(s.answers) for s in samples]
        return batch


def batch_to(batch: dict, device, dtype: Optional[torch.dtype] = None, image_size: Optional[int] = None) -> dict:
    """The batch's tensors on `device` (pixel_values also cast to `dtype` when given); lists unchanged.
    A batch of raw uint8 `images` gets its pixel_values made there (`clip_pixel_values`, `image_size`)."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "images" in moved:
        if image_size is None:
            raise ValueError("batch_to: a batch of raw images needs image_size")
        moved["pixel_values"] = clip_pixel_values(list(moved.pop("images")), image_size)
    if dtype is not None:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


def vqa_loader(samples: Sequence[VQASample], collate: Callable, batch_size: int, shuffle: bool, seed: int,
               workers: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over `samples` (a list is a map-style dataset) with a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(list(samples), batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                                       generator=generator, num_workers=workers, drop_last=drop_last,
                                       pin_memory=torch.cuda.is_available())


def cifar10_vqa_tokenizer():
    """The word tokenizer of the generated CIFAR-10 VQA set (all its questions and answers)."""
    from vlm.tokenizer import WordTokenizer
    texts = [WHAT_QUESTION, "yes", "no", *CIFAR10_CLASSES, *(IS_THERE_QUESTION.format(c) for c in CIFAR10_CLASSES)]
    return WordTokenizer.from_texts(texts)
