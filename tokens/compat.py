"""A guarded fix for clip_benchmark's top-k accuracy under numpy >= 2.4.

clip_benchmark 1.6.2 (the newest release; used for the SPEC section 4 zero-shot
evaluation) computes accuracy as float(numpy array of shape (1,)). numpy 2.4
turned that long-deprecated conversion into a TypeError, so every zero-shot
classification run dies after all images were encoded. The shim is applied
only while our CLI runs clip_benchmark, only if the installed function actually
fails on a probe input (so a fixed clip_benchmark, or numpy < 2.4, is left
alone), and the original is put back afterwards. It returns the same numbers.
"""
from contextlib import contextmanager

import torch


def topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)):
    """Fraction of rows whose target is among the k highest logits, for each k."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]


def _broken(accuracy) -> bool:
    try:
        accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), topk=(1,))
    except TypeError:
        return True
    return False


@contextmanager
def benchmark_fixes():
    from clip_benchmark.metrics import zeroshot_classification as zeroshot
    original = zeroshot.accuracy
    if not _broken(original):
        yield
        return
    zeroshot.accuracy = topk_accuracy
    try:
        yield
    finally:
        zeroshot.accuracy = original
