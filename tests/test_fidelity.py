"""Fidelity to the reference definitions (issue 16, section 1): every criteria of channels, heads and
neurons on hand-made tensors with hand-computed numbers, the reference's kept-channel count, refill+
for heads/neurons, and the dense stem/classifier."""
import math

import pytest
import torch
import torch.nn as nn

from pruners.channels import channels_to_keep, regroup_to_channels
from pruners.criteria import output_scores
from pruners.heads import count_to_keep, head_scores, neuron_scores, regroup_to_heads, regroup_to_neurons
from pruners.masks import dense_masks, global_magnitude_masks


def linear(weight, bias=None):
    weight = torch.tensor(weight, dtype=torch.float32)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    return layer


def scores(criteria, layer, masks=None, model=None, batches=()):
    masks = masks or {"layer.weight": torch.ones_like(layer.weight)}
    return output_scores(criteria, {"layer": layer}, masks, model or layer, lambda: iter(batches))["layer"]


ISSUE_WEIGHTS = [[1.0, 0.69, 0.68], [0.8, 0.75, 0.7], [0.01, 0.02, 0.03], [0.011, 0.021, 0.031]]


def test_magnitude_scores_the_whole_trained_row_not_the_new_element_mask():
    layer = linear(ISSUE_WEIGHTS)
    weights = {"layer.weight": layer.weight.detach()}
    element = global_magnitude_masks(weights, dense_masks(weights), 8 / 12)
    assert element["layer.weight"].tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    magnitude = scores("magnitude", layer, element)
    assert magnitude.tolist() == pytest.approx([2.37, 2.25, 0.06, 0.063])
    assert int(magnitude.argmax()) == 0  # the reference's top channel (the old masked L1 picked channel 1)
    assert scores("remain", layer, element).tolist() == [1, 3, 0, 0]
    # n = 4/3: the reference keeps int(1.33) + 1 = 2 channels, the top two by magnitude
    kept = regroup_to_channels(element["layer.weight"], magnitude)
    assert kept.all(1).tolist() == [True, True, False, False]


def test_kept_channel_count_is_the_references_threshold_channel_included():
    layer = linear([[4, 3.9], [3, 2.9], [0.2, 0.1], [0.4, 0.3]])
    weights = {"layer.weight": layer.weight.detach()}
    element = global_magnitude_masks(weights, dense_masks(weights), 0.5)["layer.weight"]  # n = 4 / 2 = 2.0
    magnitude = scores("magnitude", layer, {"layer.weight": element})
    assert magnitude.tolist() == pytest.approx([7.9, 5.9, 0.3, 0.7])
    reference = regroup_to_channels(element, magnitude)
    assert torch.nonzero(reference.all(1)).flatten().tolist() == [0, 1, 3]
    nearest = regroup_to_channels(element, magnitude, rule="nearest")
    assert torch.nonzero(nearest.all(1)).flatten().tolist() == [0, 1]


@pytest.mark.parametrize("surviving,fan_in,channels,fillback,reference,nearest", [
    (50, 10, 8, 0.0, 6, 5),  # n = 5: int(5) + 1 | round(5)
    (2, 10, 8, 0.0, 1, 1),  # n = 0.2: at least one channel either way
    (50, 10, 8, 0.5, 7, 7),  # int(5 + 1.5) + 1 | 5 + round(1.5) = 5 + 2
    (80, 10, 8, 0.0, 8, 8),  # a dense layer: C - int_channel = 0 keeps all
    (79, 10, 8, 0.0, 8, 8),  # n = 7.9: int + 1 = 8 | round = 8
    (25, 10, 8, 0.0, 3, 2),  # n = 2.5: round() takes halves to even -> 2
    (35, 10, 8, 0.0, 4, 4),  # n = 3.5: round -> 4
    (0, 10, 8, 0.25, 3, 3),  # n = 0: int(8 * 0.25) + 1 | max(1, 0) + round(7 * 0.25) = 1 + 2
    (30, 10, 8, 1.0, 8, 8),  # fillback 1 refills every channel
])
def test_channels_to_keep_rules(surviving, fan_in, channels, fillback, reference, nearest):
    assert channels_to_keep(surviving, fan_in, channels, fillback) == reference
    assert channels_to_keep(surviving, fan_in, channels, fillback, rule="nearest") == nearest


def test_channels_to_keep_rejects_bad_rule_and_rate():
    with pytest.raises(ValueError, match="unknown refill count rule 'round'"):
        channels_to_keep(5, 1, 8, rule="round")
    with pytest.raises(ValueError, match="fillback_rate must be in"):
        channels_to_keep(5, 1, 8, fillback_rate=1.5)


def conv_and_batch():
    """Conv 1 -> 2 channels, 1x1, weights [2, -1], on one image [1, -3] (1 x 2 pixels)."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
    return conv, [(torch.tensor([1.0, -3.0]).view(1, 1, 1, 2), torch.tensor([0]))]


def test_channel_activation_criteria_by_hand():
    conv, batches = conv_and_batch()  # channel 0 map [2, -6], channel 1 map [-1, 3]
    model = nn.Sequential(conv, nn.Flatten())
    assert scores("l1", conv, model=model, batches=batches).tolist() == [8.0, 4.0]  # sum |a|
    assert scores("l2", conv, model=model, batches=batches).tolist() == [40.0, 10.0]  # sum a^2, no sqrt
    assert scores("l1", conv, model=model, batches=batches * 2).tolist() == [16.0, 8.0]  # batches add up
    assert scores("magnitude", conv).tolist() == [2.0, 1.0]


def test_saliency_is_sum_of_activation_times_gradient_by_hand():
    # logits = a = W x with W = diag(2, -1), x = [ln 6 / 2, -ln 2] -> a = [ln 6, ln 2], softmax [3/4, 1/4];
    # label 1: dL/da = softmax - onehot = [3/4, -3/4]; saliency = |a * dL/da| = [3/4 ln 6, 3/4 ln 2]
    layer = linear([[2.0, 0.0], [0.0, -1.0]])
    batches = [(torch.tensor([[math.log(6) / 2, -math.log(2)]]), torch.tensor([1]))]
    assert scores("saliency", layer, batches=batches).tolist() == pytest.approx(
        [0.75 * math.log(6), 0.75 * math.log(2)], rel=1e-6)
    assert scores("l1", layer, batches=batches).tolist() == pytest.approx([math.log(6), math.log(2)], rel=1e-6)


def qkv_example():
    """qkv of 2 heads x head_dim 1 on dim 2 (rows q0 q1 k0 k1 v0 v1), one token x = [1, 2]:
    head 0 outputs (q, k, v) = (3, 0, 0), head 1 outputs (2, 2, 0)."""
    layer = linear([[3, 0], [2, 0], [0, 0], [0, 1], [0, 0], [0, 0]])
    return layer, [(torch.tensor([[[1.0, 2.0]]]), torch.tensor([0]))]


def test_head_criteria_follow_the_vit_reference():
    layer, batches = qkv_example()
    model = nn.Sequential(layer, nn.Flatten(1))
    per_head = {c: head_scores(scores(c, layer, model=model, batches=batches), 2) for c in ("l1", "l2")}
    assert per_head["l1"].tolist() == [3.0, 4.0]  # sum |a| of the head's q, k, v outputs
    assert per_head["l2"].tolist() == [9.0, 8.0]  # sum a^2 per head
    # the reference: sqrt(mean a^2) over (batch, tokens, q/k/v, head_dim) = sqrt(9/3), sqrt(8/3): head 0 first
    # (the old per-row sqrt sum gave 3 vs 4, head 1 first)
    feat = layer(batches[0][0]).view(1, 1, 3, 2, 1)
    reference = (feat ** 2).mean(dim=[0, 1, 2, 4]).sqrt()
    assert torch.equal(reference.argsort(), per_head["l2"].argsort())
    assert per_head["l2"].tolist() == pytest.approx((reference ** 2 * 3).tolist())
    reference_l1 = feat.abs().mean(dim=[0, 1, 2, 4])
    assert per_head["l1"].tolist() == pytest.approx((reference_l1 * 3).tolist())


def test_head_magnitude_and_remain_use_whole_rows_and_the_new_mask():
    layer, _ = qkv_example()
    mask = torch.ones(6, 2)
    mask[0] = 0  # the new element-wise mask drops head 0's q row
    masks = {"layer.weight": mask}
    assert head_scores(scores("magnitude", layer, masks), 2).tolist() == [3.0, 3.0]  # |3| | |2| + |1|: unmasked
    assert head_scores(scores("remain", layer, masks), 2).tolist() == [4.0, 6.0]


def test_neuron_criteria_and_glu_pairs():
    fc1 = linear([[1, -1], [2, 0], [0, 0.5]])  # 3 neurons, x = [1, 2] -> outputs [-1, 2, 1]
    batches = [(torch.tensor([[1.0, 2.0]]), torch.tensor([0]))]
    assert scores("magnitude", fc1).tolist() == [2.0, 2.0, 0.5]
    assert scores("l1", fc1, batches=batches).tolist() == [1.0, 2.0, 1.0]
    assert scores("l2", fc1, batches=batches).tolist() == [1.0, 4.0, 1.0]
    # a packed GLU fc1 [value; gate] of 2 neurons: neuron j owns rows j and 2 + j
    assert neuron_scores(torch.tensor([1.0, 2.0, 10.0, 20.0]), 2).tolist() == [11.0, 22.0]


def test_refill_plus_adds_heads_and_neurons():
    assert count_to_keep(268 / 384, 384) == 268
    assert count_to_keep(268 / 384, 384, 0.1) == 268 + round(116 * 0.1)  # 280
    assert count_to_keep(268 / 384, 384, 0.5) == 268 + 58
    assert count_to_keep(1 / 3, 3, 0.5) == 1 + round(2 * 0.5)  # 2 heads
    assert count_to_keep(0.5, 3, 0.0) == 2  # round(1.5): halves to even
    qkv, proj = torch.ones(9, 3), torch.zeros(3, 3)
    qkv[:, 1:] = 0  # density 9 / 36: round(0.75) = one head
    scores_ = torch.tensor([1.0, 3.0, 2.0])
    assert regroup_to_heads(qkv, proj, scores_)[2].tolist() == [False, True, False]
    assert regroup_to_heads(qkv, proj, scores_, fillback_rate=0.5)[2].tolist() == [False, True, True]
    fc1, fc2 = torch.ones(8, 2), torch.zeros(2, 4)  # a GLU: 4 neurons, density 16 / 24 -> 3 neurons
    new_fc1, new_fc2, keep = regroup_to_neurons(fc1, fc2, torch.tensor([4.0, 1.0, 3.0, 2.0]))
    assert keep.tolist() == [True, False, True, True]
    assert new_fc1.all(1).tolist() == [True, False, True, True] * 2 and new_fc2.all(0).tolist() == keep.tolist()
    assert regroup_to_neurons(fc1, fc2, torch.tensor([4.0, 1.0, 3.0, 2.0]), 1.0)[2].all()


def test_stem_and_classifier_stay_dense_unless_conv1_and_fc():
    from models import create_model, dense_modules
    from pruners.masks import prunable_weights
    from utils.cli import parse_config
    for arch, stem, head in (("res20s", "conv1.weight", "fc.weight"), ("vit_tiny", "patch_embed.proj.weight",
                                                                      "head.weight")):
        model = create_model(arch, 10)
        for flags, pruned in (([], set()), (["--conv1"], {stem}), (["--fc"], {head}),
                              (["--prune_classifier", "--conv1"], {stem, head})):
            config = parse_config(["--arch", arch, "--struct", "none", *flags])
            names = set(prunable_weights(model, exclude=dense_modules(model, config.conv1, config.prune_classifier)))
            assert names & {stem, head} == pruned, (arch, flags)
    assert parse_config(["--struct", "refill", "--refill_count", "nearest"]).refill_count == "nearest"
    assert parse_config([]).refill_count == "reference"
    with pytest.raises(Exception, match="--refill_count nearest: not used with --struct none"):
        parse_config(["--struct", "none", "--refill_count", "nearest"])


def test_configs_saved_before_the_stem_flag_replay_what_they_ran():
    from utils.config import RunConfig
    legacy = RunConfig.from_dict({"arch": "res20s", "struct": "refill"})  # written before issue 16
    assert legacy.conv1 is True and legacy.refill_count == "nearest"
    current = RunConfig.from_dict(RunConfig(struct="refill").to_dict())
    assert current.conv1 is False and current.refill_count == "reference"


def test_head_saliency_is_the_heads_sum_of_activation_times_gradient():
    layer, batches = qkv_example()  # a = rows q0 q1 k0 k1 v0 v1 = [3, 2, 0, 2, 0, 0]
    classifier = linear([[1, 0, -1, 2, 0, 1], [0, 1, 1, 0, -2, 0]])  # logits [7, 2]
    model = nn.Sequential(layer, nn.Flatten(1), classifier)
    got = head_scores(scores("saliency", layer, model=model, batches=batches), 2)
    # label 0: dL/dlogits = softmax - onehot = p1 * [-1, 1] with p1 = softmax([7, 2])[1] = 1 / (1 + e^5);
    # dL/da = p1 * [-1, 1, 2, -2, -2, -1]; |a * dL/da| = p1 * [3, 2, 0, 4, 0, 0]: head 0 3 p1, head 1 6 p1
    p1 = 1 / (1 + math.exp(5))
    assert got.tolist() == pytest.approx([3 * p1, 6 * p1], rel=1e-5)
