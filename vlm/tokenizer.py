"""A word-level tokenizer for the tiny LLaVA (its vocabulary is closed: the generated VQA questions
and answers), stored in checkpoints as a plain list of words so they stay weights_only-loadable.

Text is lower-cased and split on whitespace, with punctuation marks as words of their own
("what is in the picture?" -> what | is | in | the | picture | ?). Ids 0-4 are the special tokens.
"""
import re
from typing import Iterable, List, Sequence

import torch

from utils.errors import UsageError

PAD, BOS, EOS, IMAGE, UNK = "<pad>", "<bos>", "<eos>", "<image>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, UNK)
_WORDS = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def split_words(text: str) -> List[str]:
    """Lower-cased words and single punctuation marks of `text`, in order."""
    return _WORDS.findall(text.lower())


class WordTokenizer:
    """Word <-> id map with the special tokens pad (0), bos (1), eos (2), image (3), unk (4).

    `encode(text) -> list[int]` (unknown words -> unk id), `decode(ids) -> str` (special tokens dropped,
    stops at the first eos). `words` (the whole vocabulary, specials first) round-trips through
    `WordTokenizer.from_words`.
    """

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise UsageError(f"tokenizer vocabulary must start with {', '.join(SPECIAL_TOKENS)}")
        if len(set(words)) != len(words):
            raise UsageError("tokenizer vocabulary holds a word twice")
        self.words = words
        self.index = {word: i for i, word in enumerate(words)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordTokenizer":
        """The vocabulary of `texts`: special tokens, then the words in sorted order (deterministic)."""
        found = {word for text in texts for word in split_words(text)}
        return cls(list(SPECIAL_TOKENS) + sorted(found - set(SPECIAL_TOKENS)))

    @classmethod
    def from_words(cls, words: Sequence[str]) -> "WordTokenizer":
        return cls(words)

    def __len__(self) -> int:
        return len(self.words)

    pad_token_id = property(lambda self: self.index[PAD])
    bos_token_id = property(lambda self: self.index[BOS])
    eos_token_id = property(lambda self: self.index[EOS])
    image_token_id = property(lambda self: self.index[IMAGE])
    unk_token_id = property(lambda self: self.index[UNK])

    def encode(self, text: str) -> List[int]:
        unk = self.unk_token_id
        return [self.index.get(word, unk) for word in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if 0 <= i < len(self.words) and i >= len(SPECIAL_TOKENS):
                out.append(self.words[i])
        return " ".join(out)


class HFProcessorCollator:
    """The batch format of `vlm.data.VQACollator` from a Hugging Face LLaVA processor
    (`AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")`), for users with those weights.

    The processor expands "<image>" in `prompt` into one image-token id per vision token and
    resizes / normalises the images (336 px, CLIP mean/std). The answer is tokenised on its own
    (`" " + answer`, no special tokens) and followed by the tokenizer's eos; labels cover exactly
    those ids. LEFT padding with the tokenizer's pad id (its unk id when it has none).
    """

    def __init__(self, processor, prompt: str = "USER: <image>\n{question} ASSISTANT:", with_answers: bool = True):
        if "<image>" not in prompt or "{question}" not in prompt:
            raise UsageError(f"prompt {prompt!r}: must hold '<image>' and '{{question}}'")
        self.processor, self.prompt, self.with_answers = processor, prompt, with_answers
        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        if pad is None or tokenizer.eos_token_id is None:
            raise UsageError("processor's tokenizer has no pad/unk or no eos token")
        self.pad_token_id, self.eos_token_id = pad, tokenizer.eos_token_id

    def __call__(self, samples) -> dict:
        from vlm.data import left_padded, load_image, training_answer
        images = [load_image(s.image) for s in samples]
        encoded = self.processor(images=images, text=[self.prompt.format(question=s.question) for s in samples],
                                 return_tensors=None)
        answers = None
        if self.with_answers:
            tokenizer = self.processor.tokenizer
            answers = [tokenizer(" " + training_answer(s), add_special_tokens=False)["input_ids"] + [self.eos_token_id]
                       for s in samples]
        batch = left_padded(encoded["input_ids"], answers, self.pad_token_id)
        pixels = encoded["pixel_values"]
        batch["pixel_values"] = pixels if isinstance(pixels, torch.Tensor) else torch.stack(
            [torch.as_tensor(p) for p in pixels])
        batch["answers"] = [list(s.answers) for s in samples]
        return batch
