"""Vision pre-training of the tiny LLaVA (vlm/vision_pretrain.py, train_tiny_llava.py --vision_pretrain_steps /
--freeze_vision): the augmentation is a crop + flip of the padded image, the split is the VQA training's, the stage
learns a separable task and touches only the tower and projector, a frozen tower stays as it was, and the flags
refuse bad values in one line."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from vlm.data import cifar10_vqa  # noqa: E402
from vlm.llava import build_llava, llava_parts, tiny_llava_config  # noqa: E402
from vlm.pretrain import load_tiny_llava, main  # noqa: E402
from data.loader import PAD, random_crop_flip  # noqa: E402 - the runner's augmentation, used by the pre-training
from vlm.vision_pretrain import labelled_images, pretrain_vision  # noqa: E402

ARCH = ["--hidden_size", "32", "--num_layers", "2", "--vision_hidden_size", "32", "--vision_layers", "1",
        "--image_size", "28"]
TINY = ["--batch_size", "4", "--warmup", "1", "--train_images", "64", "--val_images", "16", "--eval_images", "4",
        "--eval_every", "100", "--workers", "0", "--no_progress"]


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).view(2, 3, 6, 6).to(torch.uint8)
    generator = torch.Generator().manual_seed(0)
    crops = random_crop_flip(images, generator)
    assert crops.shape == images.shape and crops.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    for image, crop in zip(padded, crops):
        windows = [window for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)
                   for window in (image[:, dy:dy + 6, dx:dx + 6], image[:, dy:dy + 6, dx:dx + 6].flip(-1))]
        assert any(torch.equal(crop, window) for window in windows)
    again = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)  # seeded
    many = random_crop_flip(images.repeat(50, 1, 1, 1), torch.Generator().manual_seed(1))
    assert len({tuple(c.flatten().tolist()) for c in many[0::2]}) > 10  # offsets and flips vary


def test_labelled_images_are_the_vqa_split():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([3, 0, 9, 9, 1])
    got_images, got_labels = labelled_images(cifar10_vqa(images, labels, seed=0))
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)


def _colour_classes(count, seed):
    """28-px images whose class (0..3) is which colour channel (or none) is bright: linearly separable."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (count,), generator=generator)
    images = torch.randint(0, 60, (count, 3, 28, 28), generator=generator, dtype=torch.uint8)
    for channel in range(3):
        images[labels == channel, channel] += 180
    return images, labels


def test_pretraining_learns_and_touches_only_the_vision_side(one_thread):
    torch.manual_seed(0)
    model = build_llava(tiny_llava_config(40, 38, 39, num_layers=2, hidden_size=32, vision_hidden_size=32,
                                          vision_layers=1, image_size=28)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    summary = pretrain_vision(model, _colour_classes(256, 0), _colour_classes(200, 1), image_size=28, steps=40,
                              minutes=None, batch_size=32, lr=3e-3, weight_decay=0.0, warmup=5, seed=0, amp=False,
                              record=records.append, log=lambda line: None)
    assert summary["steps"] == 40 and summary["epochs_seen"] == 5.0
    assert summary["val_accuracy"] >= 90.0  # chance: 25 %
    assert [r["step"] for r in records] == [40] and records[0]["type"] == "vision_pretrain"
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    with pytest.raises(ValueError, match="steps .* must be positive"):
        pretrain_vision(model, _colour_classes(8, 0), _colour_classes(8, 1), image_size=28, steps=0, minutes=None,
                        batch_size=4, lr=1e-3, weight_decay=0.0, warmup=1, seed=0, amp=False)


def test_cli_pretrains_then_freezes_the_tower(cifar10_root, tmp_path, one_thread):
    out = tmp_path / "run"
    assert main(["--data", cifar10_root, "--out", str(out), *TINY, *ARCH, "--steps", "2",
                 "--vision_pretrain_steps", "3", "--vision_pretrain_batch_size", "8", "--freeze_vision"]) == 0
    summary = json.loads((out / "tiny_llava.json").read_text())
    assert summary["vision_pretrain"]["steps"] == 3 and summary["vision_frozen"] is True
    assert 0.0 <= summary["vision_pretrain"]["val_accuracy"] <= 100.0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r.get("type") for r in records] == ["vision_pretrain", "step"]


def test_frozen_tower_keeps_its_weights(cifar10_root, tmp_path, one_thread):
    first, second = tmp_path / "first", tmp_path / "frozen"
    assert main(["--data", cifar10_root, "--out", str(first), *TINY, *ARCH, "--steps", "2"]) == 0
    assert main(["--data", cifar10_root, "--out", str(second), *TINY, "--steps", "2", "--freeze_vision",
                 "--init", str(first / "tiny_llava.pt")]) == 0
    start, end = (llava_parts(load_tiny_llava(str(folder / "tiny_llava.pt"))[0]) for folder in (first, second))
    assert all(torch.equal(a, b) for a, b in zip(start.vision_tower.parameters(), end.vision_tower.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(start.projector.parameters(), end.projector.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(start.language_model.parameters(),
                                                     end.language_model.parameters()))


@pytest.mark.parametrize("flags, message", [
    (["--vision_pretrain_steps", "-1"], "--vision_pretrain_steps -1: must be 0 (none) or positive"),
    (["--vision_pretrain_minutes", "2"], "--vision_pretrain_minutes 2: give --vision_pretrain_steps too"),
    (["--vision_pretrain_steps", "5", "--vision_pretrain_lr", "0"],
     "--vision_pretrain_lr 0.0: must be a positive finite number"),
    (["--vision_pretrain_lr", "nan"], "--vision_pretrain_lr nan: must be a positive finite number"),
    (["--lr", "nan"], "--lr nan: must be a positive finite number"),
    (["--minutes", "inf"], "--minutes inf: must be a positive finite number"),
    (["--vision_pretrain_steps", "5", "--vision_pretrain_minutes", "inf"],
     "--vision_pretrain_minutes inf: must be a positive finite number"),
    (["--weight_decay", "nan"], "--weight_decay nan: must be a finite number >= 0"),
    (["--vision_pretrain_batch_size", "0"], "--vision_pretrain_batch_size 0: must be positive"),
    (["--train_images", "500", "--vision_pretrain_steps", "5", "--vision_pretrain_batch_size", "1000"],
     "--vision_pretrain_batch_size 1000: more than the --train_images 500"),
    (["--train_images", "10", "--batch_size", "64"], "--batch_size 64: more than the 20 questions of --train_images 10"),
    (["--freeze_vision"], "--freeze_vision: the tower would stay at its random init"),
])
def test_bad_flags_one_line(tmp_path, capsys, flags, message):
    assert main(["--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
