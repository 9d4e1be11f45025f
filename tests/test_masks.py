"""Pure mask math on tiny hand-made tensors."""
import pytest
import torch

from pruners.masks import (apply_masks, dense_masks, difference, global_magnitude_masks, layer_sparsity,
                           remaining_count, remaining_fraction)


def test_global_threshold_spans_layers():
    weights = {"a": torch.tensor([[1.0, -2.0], [3.0, 0.5]]), "b": torch.tensor([0.1, 4.0, -5.0, 0.2])}
    masks = global_magnitude_masks(weights, dense_masks(weights), 0.5)
    # the 4 smallest |w| overall are 0.1, 0.2 (layer b) and 0.5, 1.0 (layer a)
    assert masks["a"].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert masks["b"].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_rate_applies_to_remaining_and_pruned_stay_pruned():
    weights = {"a": torch.arange(1.0, 11.0)}
    first = global_magnitude_masks(weights, dense_masks(weights), 0.2)
    assert first["a"].tolist() == [0, 0] + [1] * 8
    # a pruned weight with a large value must not come back
    weights["a"][0] = 100.0
    second = global_magnitude_masks(weights, first, 0.25)
    assert second["a"].tolist() == [0, 0, 0, 0] + [1] * 6
    assert remaining_count(second) == 6


def test_ties_break_by_layer_order_then_position():
    weights = {"first": torch.ones(4), "second": torch.ones(4)}
    masks = global_magnitude_masks(weights, dense_masks(weights), 0.5)
    assert masks["first"].tolist() == [0, 0, 0, 0]
    assert masks["second"].tolist() == [1, 1, 1, 1]


def test_remaining_follows_compound_schedule_within_one_weight_per_layer():
    torch.manual_seed(0)
    weights = {f"layer{i}": torch.randn(37 + 11 * i, 9) for i in range(5)}
    masks, total = dense_masks(weights), sum(w.numel() for w in weights.values())
    for k in range(1, 8):
        masks = global_magnitude_masks(weights, masks, 0.3)
        assert abs(remaining_count(masks) - total * 0.7 ** k) <= len(weights)


def test_apply_and_sparsity_helpers():
    weights = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    masks = {"w": torch.tensor([1.0, 0.0, 1.0, 0.0])}
    apply_masks(weights, masks)
    assert weights["w"].tolist() == [1.0, 0.0, 3.0, 0.0]
    assert remaining_fraction(masks) == 0.5
    assert layer_sparsity(masks) == {"w": 0.5}
    assert difference({"w": torch.ones(4)}, masks)["w"].tolist() == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_rate_outside_open_interval_is_rejected(rate):
    weights = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="rate"):
        global_magnitude_masks(weights, dense_masks(weights), rate)
