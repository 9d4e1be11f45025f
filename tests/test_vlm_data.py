"""vlm/data.py and vlm/tokenizer.py: the VQA reader and metrics, the CIFAR-10 VQA set, the tokenizer,
the collate (left padding, labels only on answers) and the HF processor adapter."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from utils.errors import UsageError  # noqa: E402
from vlm.data import (CIFAR10_CLASSES, CLIP_MEAN, CLIP_STD, IS_THERE_QUESTION, WHAT_QUESTION, VQACollator,  # noqa: E402
                      VQASample, batch_to, cifar10_vqa, cifar10_vqa_splits, cifar10_vqa_tokenizer, exact_match,
                      normalize_answer, read_vqa_jsonl, vqa_accuracy)
from vlm.tokenizer import HFProcessorCollator, WordTokenizer  # noqa: E402


def test_reader_and_soft_accuracy(tmp_path):
    lines = [{"image": "a.png", "question": "What colour?", "answers": ["Red", "red", "blue", "the red", "green"]},
             {"image": "sub/b.jpg", "question": "How many?", "answer": "two"}]
    path = tmp_path / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    samples = read_vqa_jsonl(str(path))
    assert [s.question for s in samples] == ["What colour?", "How many?"]
    assert samples[0].image == str(tmp_path / "a.png") and samples[1].image == str(tmp_path / "sub" / "b.jpg")
    assert samples[1].answers == ("two",)
    answers = ["cat", "cat", "dog", "Cat.", "a dog", "bird"]
    assert vqa_accuracy("bird", answers) == pytest.approx(1 / 3)
    assert vqa_accuracy("the dog", answers) == pytest.approx(2 / 3)
    assert vqa_accuracy("CAT", answers) == 1.0
    assert vqa_accuracy("horse", answers) == 0.0
    assert exact_match("cat!", answers) == 1.0 and exact_match("dog", answers) == 0.0
    assert vqa_accuracy("2", samples[1].answers) == pytest.approx(1 / 3)  # number words become digits
    assert normalize_answer(" The  Red, car ") == "red car"


@pytest.mark.parametrize("line, message", [("{not json", "vqa.jsonl:2: not JSON"),
                                           ('{"image": "a.png", "question": "q"}', "vqa.jsonl:2: needs"),
                                           ('[1, 2]', "vqa.jsonl:2: needs")])
def test_reader_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q", "answers": ["x"]}) + "\n" + line + "\n")
    with pytest.raises(UsageError, match=message):
        read_vqa_jsonl(str(path))


def test_cifar_vqa_balanced_and_deterministic():
    labels = torch.arange(101) % 10
    images = torch.zeros(101, 3, 32, 32, dtype=torch.uint8)
    samples = cifar10_vqa(images, labels, seed=3)
    assert len(samples) == 202
    what, is_there = samples[0::2], samples[1::2]
    assert all(s.question == WHAT_QUESTION for s in what)
    assert [s.answers[0] for s in what] == [CIFAR10_CLASSES[int(label)] for label in labels]
    answers = [s.answers[0] for s in is_there]
    assert answers.count("yes") == 50 and answers.count("no") == 51
    for sample, label in zip(is_there, labels):
        asked = sample.question[len("is there a "):-1]
        assert sample.question == IS_THERE_QUESTION.format(asked) and asked in CIFAR10_CLASSES
        assert (asked == CIFAR10_CLASSES[int(label)]) == (sample.answers[0] == "yes")
    assert [s.question for s in cifar10_vqa(images, labels, seed=3)] == [s.question for s in samples]
    assert [s.question for s in cifar10_vqa(images, labels, seed=4)] != [s.question for s in samples]


def test_cifar_vqa_answers_match_the_bundle_labels(cifar10_root):
    from data import load
    train, val, test = cifar10_vqa_splits(cifar10_root, seed=0, train_images=300, val_images=100)
    splits = load("cifar10", cifar10_root, 100)
    assert (len(train), len(val), len(test)) == (600, 200, 20000)
    for samples, images, labels in ((train, splits.train.images[:300], splits.train.labels[:300]),
                                    (val, splits.val.images, splits.val.labels)):
        assert all(torch.equal(s.image, img) for s, img in zip(samples[0::2], images))
        assert [s.answers[0] for s in samples[0::2]] == [CIFAR10_CLASSES[int(y)] for y in labels]
        assert sum(s.answers[0] == "yes" for s in samples[1::2]) == len(labels) // 2


def test_tokenizer_round_trips():
    tokenizer = cifar10_vqa_tokenizer()
    assert tokenizer.words[:5] == ["<pad>", "<bos>", "<eos>", "<image>", "<unk>"]
    for text in [WHAT_QUESTION] + [IS_THERE_QUESTION.format(c) for c in CIFAR10_CLASSES] + list(CIFAR10_CLASSES):
        ids = tokenizer.encode(text)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text.replace("?", " ?")
    assert tokenizer.decode([tokenizer.bos_token_id, *tokenizer.encode("cat"), tokenizer.eos_token_id, 7]) == "cat"
    assert tokenizer.encode("zebra") == [tokenizer.unk_token_id]
    copy = WordTokenizer.from_words(list(tokenizer.words))
    assert copy.words == tokenizer.words and copy.encode("is there a cat?") == tokenizer.encode("is there a cat?")
    with pytest.raises(UsageError, match="must start with"):
        WordTokenizer(["cat"])


def test_collate_left_pads_and_labels_only_answers():
    tokenizer = cifar10_vqa_tokenizer()
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    samples = [VQASample(white, "is there a cat?", ("no",) * 10), VQASample(white, WHAT_QUESTION, ("dog",) * 10)]
    batch = VQACollator(tokenizer, num_image_tokens=16, image_size=56)(samples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    # sample 0: bos + 16 image + 5 question + no + eos = 24; sample 1: 1 + 16 + 6 + 2 = 25
    assert ids.shape == (2, 25) and mask[0].tolist() == [0] + [1] * 24 and mask[1].tolist() == [1] * 25
    assert ids[0, 0] == tokenizer.pad_token_id and ids[0, 1] == tokenizer.bos_token_id
    assert ((ids == tokenizer.image_token_id).sum(1) == 16).all()
    answer_ids = [tokenizer.encode("no") + [tokenizer.eos_token_id], tokenizer.encode("dog") + [tokenizer.eos_token_id]]
    for row, answer in enumerate(answer_ids):
        supervised = (labels[row] != -100).nonzero().flatten().tolist()
        assert supervised == [23, 24] and labels[row, 23:].tolist() == answer == ids[row, 23:].tolist()
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert batch["pixel_values"].shape == (2, 3, 56, 56)
    assert torch.allclose(batch["pixel_values"][:, :, 10, 10], expected.expand(2, 3), atol=1e-5)
    prompts = VQACollator(tokenizer, 16, 56, with_answers=False)(samples)
    assert "labels" not in prompts and prompts["input_ids"][1].tolist() == ids[1, :23].tolist()
    raw = VQACollator(tokenizer, 16, 56, raw_images=True)(samples)
    assert torch.allclose(batch_to(raw, "cpu", image_size=56)["pixel_values"], batch["pixel_values"], atol=1e-5)


def _local_llava_processor():
    """A LlavaProcessor built here (no hub): a word-level fast tokenizer and a 336-px CLIP image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER", ":", "ASSISTANT", "what", "is", "in", "the",
             "picture", "?", "yes", "no", "cat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_hf_processor_adapter_gives_the_same_batch_format():
    collate = HFProcessorCollator(_local_llava_processor(), prompt="USER : <image> {question} ASSISTANT :")
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    batch = collate([VQASample(image, "what is in the picture ?", ("cat",)), VQASample(image, "is cat ?", ("yes",))])
    ids, labels = batch["input_ids"], batch["labels"]
    assert ((ids == 4).sum(1) == 576).all() and batch["pixel_values"].shape == (2, 3, 336, 336)
    assert batch["attention_mask"][1].tolist()[:4] == [0, 0, 0, 1] and ids[1, :3].tolist() == [3, 3, 3]
    assert labels[0, -2:].tolist() == [16, 2] and labels[1, -2:].tolist() == [14, 2]
    assert ((labels != -100).sum(1) == 2).all()
    with pytest.raises(UsageError, match="prompt"):
        HFProcessorCollator(_local_llava_processor(), prompt="{question}")
