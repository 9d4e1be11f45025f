"""Anchor token scoring (tokens/anchor.py) on hand-made tensors."""
import pytest
import torch

from tokens.anchor import (attention_rows, check_budget, choose_anchors, keep_indices, select_tokens)

N, D_HEAD = 7, 8


def toy_inputs(cls_target: int = 3, anchor_likes=(1, 5)):
    """One head; keys are one-hot (K_i = e_i) so q . K_i = q[i] and attention is set by hand.

    CLS attends most to `cls_target` (the anchor); the anchor attends to `anchor_likes`
    (importance); tokens 2 and 6 point away from the anchor's direction (diversity).
    """
    keys = torch.eye(N, D_HEAD).view(1, 1, N, D_HEAD)
    queries = torch.zeros(1, 1, N, D_HEAD)
    queries[0, 0, 0, cls_target] = 6.0
    queries[0, 0, cls_target, anchor_likes[0]] = 5.0
    queries[0, 0, cls_target, anchor_likes[1]] = 4.0
    x = torch.tensor([[0.2, 0.5, 0.3],      # CLS
                      [1.0, 0.1, 0.0],      # close to the anchor
                      [-1.0, 0.0, 0.0],     # opposite to the anchor: D = 2
                      [1.0, 0.0, 0.0],      # the anchor
                      [1.0, 0.2, 0.2],      # close to the anchor
                      [1.0, 0.0, 0.1],      # close to the anchor
                      [0.0, 1.0, 0.0]]).unsqueeze(0)  # orthogonal: D = 1
    return x, keys, queries


def test_alpha_one_selects_by_importance_only():
    x, keys, queries = toy_inputs()
    sel = select_tokens(x, keys, queries, k_anchors=1, top_m=2, alpha=1.0, scale=1.0)
    assert sel.anchors.tolist() == [[3]]
    assert sel.keep.tolist() == [[0, 1, 3, 5]]


def test_alpha_zero_selects_by_diversity_only():
    x, keys, queries = toy_inputs()
    sel = select_tokens(x, keys, queries, k_anchors=1, top_m=2, alpha=0.0, scale=1.0)
    assert sel.keep.tolist() == [[0, 2, 3, 6]]


def test_cls_attention_is_head_mean_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 9, 4)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1).mean(1)
    assert torch.allclose(attention_rows(q, k), expected, atol=1e-6)
    assert torch.allclose(attention_rows(q, k).sum(-1), torch.ones(2, 1))


def test_scaled_cosine_attention_rows():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 6, 4)
    logit_scale = torch.tensor([10.0, 3.0]).view(2, 1, 1)
    cosine = torch.nn.functional.cosine_similarity(q, k, dim=-1)  # [1, 2, 6]
    expected = torch.softmax(cosine * logit_scale[:, :, 0], dim=-1).mean(1, keepdim=True)
    assert torch.allclose(attention_rows(q, k, logit_scale=logit_scale), expected, atol=1e-6)


def test_selection_is_per_sample():
    first, keys, q_first = toy_inputs(cls_target=3, anchor_likes=(1, 5))
    second, _, q_second = toy_inputs(cls_target=4, anchor_likes=(6, 2))
    x, queries = torch.cat([first, second]), torch.cat([q_first, q_second])
    sel = select_tokens(x, keys.expand(2, -1, -1, -1), queries, k_anchors=1, top_m=2, alpha=1.0, scale=1.0)
    assert sel.anchors.tolist() == [[3], [4]]
    assert sel.keep.tolist() == [[0, 1, 3, 5], [0, 2, 4, 6]]
    alone = select_tokens(second, keys, q_second, k_anchors=1, top_m=2, alpha=1.0, scale=1.0)
    assert torch.equal(alone.keep[0], sel.keep[1])


def test_keep_is_sorted_and_keeps_every_prefix_token():
    torch.manual_seed(1)
    x, q, k = torch.randn(4, 20, 16), torch.randn(4, 2, 20, 8), torch.randn(4, 2, 20, 8)
    sel = select_tokens(x, k, q, k_anchors=3, top_m=5, alpha=0.5, num_prefix_tokens=2)
    assert sel.keep.shape == (4, 10)
    assert torch.equal(sel.keep, sel.keep.sort(dim=1).values)
    assert (sel.keep[:, :2] == torch.tensor([0, 1])).all()
    assert (sel.anchors >= 2).all()
    for row, anchors in zip(sel.keep, sel.anchors):
        assert set(anchors.tolist()) <= set(row.tolist()) and len(set(row.tolist())) == 10


def test_keep_indices_excludes_anchors_and_prefix_from_top_m():
    scores = torch.tensor([[9.0, 8.0, 7.0, 1.0, 6.0, 0.5]])
    assert keep_indices(scores, torch.tensor([[1]]), top_m=2).tolist() == [[0, 1, 2, 4]]


def test_choose_anchors_skips_the_cls_token():
    cls_attention = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.05]])
    assert choose_anchors(cls_attention, 2).tolist() == [[2, 1]]


def test_zero_anchors_use_cls_as_the_reference():
    x, keys, queries = toy_inputs()
    queries[0, 0, 0, 5] = 3.0  # CLS attention: token 3 first, token 5 second, the rest tied below
    by_importance = select_tokens(x, keys, queries, k_anchors=0, top_m=2, alpha=1.0, scale=1.0)
    assert by_importance.anchors.shape == (1, 0)
    assert by_importance.keep.tolist() == [[0, 3, 5]]
    # diversity from the CLS token x_0 = (.2, .5, .3): D = 1.32 for token 2, 0.68 for token 3, <= 0.63 for the rest
    by_diversity = select_tokens(x, keys, queries, k_anchors=0, top_m=2, alpha=0.0, scale=1.0)
    assert by_diversity.keep.tolist() == [[0, 2, 3]]


def test_budget_error_names_both_numbers():
    with pytest.raises(ValueError, match=r"keeps 61 tokens.*only 50 tokens"):
        check_budget(50, 10, 50)
    assert check_budget(197, 10, 50) == 61


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    x, keys, queries = toy_inputs()
    with pytest.raises(ValueError, match="alpha"):
        select_tokens(x, keys, queries, 1, 2, alpha)
