"""The merger's `assignment` option (issue 11, the merge-stage accuracy gap): `others` keeps each centre's own
token at weight 1 and soft-assigns only the other tokens; `all` (the default) stays the seed's merge."""
import math
import os

import pytest
import torch

from utils.errors import UsageError
from vlm.config import VLMPruningConfig, load_config, validate
from vlm.merger import LearnableTokenMerger, assign_others, merge_features

pytestmark = pytest.mark.usefixtures("one_thread")
B, N, D = 2, 12, 8
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "vision_token_pruning.yaml")


@pytest.fixture
def vision():
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(0))


def _merger(assignment, **kwargs):
    torch.manual_seed(1)
    return LearnableTokenMerger(D, N, merge_ratio=0.5, d_internal=6, assignment=assignment, **kwargs)


def _logits(merger, vision, centres, temperature):
    """The merger's assignment logits [B, N, M] for the given centres (its forward's arithmetic)."""
    centre_features = vision.gather(1, centres[..., None].expand(-1, -1, D))
    query, key = merger.assign_query(vision), merger.assign_key(centre_features)
    return query @ key.transpose(1, 2) / (math.sqrt(query.shape[-1]) * temperature)


def _seed_forward(merger, vision, temperature):
    """The seed's merger forward (before `assignment` existed), step for step: the reference for `all`."""
    scores = merger.importance(vision)
    perturbed = scores - torch.empty_like(scores).exponential_().log() if merger.training else scores
    top = perturbed.topk(merger.num_centres + 1, dim=-1)
    centres = top.indices[:, :-1].sort(dim=-1).values
    threshold = top.values[:, -2:].mean(dim=-1, keepdim=True).detach()
    membership = torch.sigmoid((perturbed - threshold) / temperature).gather(1, centres)
    selection = 1.0 + membership - membership.detach()
    assignment = _logits(merger, vision, centres, temperature).float().softmax(dim=-1)
    mass = assignment.sum(dim=1).clamp_min(1e-6)
    merged = torch.einsum("bnm,bnd->bmd", assignment, vision.float()) / mass[..., None]
    return (merged * selection[..., None]).to(vision.dtype), assignment, centres


@pytest.mark.parametrize("training", [False, True])
def test_all_is_the_seed_merge_bit_for_bit(vision, training):
    merger = _merger("all").train(training)
    assert LearnableTokenMerger(D, N, d_internal=6).assignment == "all"  # the default
    torch.manual_seed(2)
    out = merger(vision, 0.5)
    torch.manual_seed(2)  # the same Gumbel draws
    merged, assignment, centres = _seed_forward(merger, vision, 0.5)
    assert torch.equal(out.centres, centres)
    assert torch.equal(out.assignment, assignment)
    assert torch.equal(out.merged, merged)


@pytest.mark.parametrize("training", [False, True])
def test_others_centre_rows_are_one_hot_on_themselves(vision, training):
    out = _merger("others").train(training)(vision, 0.5)
    M = out.num_centres
    rows = out.assignment.gather(1, out.centres[..., None].expand(-1, -1, M))  # [B, M, M]: centre j's row
    assert torch.equal(rows, torch.eye(M).expand(B, M, M))
    others = torch.ones(B, N, dtype=torch.bool).scatter_(1, out.centres, False)
    assert int(others.sum()) == B * (N - M)
    soft = out.assignment[others]  # [B (N - M), M]
    assert torch.allclose(soft.sum(dim=-1), torch.ones(B * (N - M)))
    assert bool((soft > 0).all()) and bool((soft < 1).all())  # softly assigned, not one-hot


def test_no_weight_from_other_tokens_gives_the_centre_tokens_exactly(vision):
    centres = torch.tensor([[0, 3, 5, 7, 8, 11], [1, 2, 4, 6, 9, 10]])
    assignment = torch.zeros(B, N, 6).scatter_(1, centres[:, None, :], 1.0)  # centre rows one-hot, others 0
    merged = merge_features(assignment, vision)
    assert torch.equal(merged, vision.gather(1, centres[..., None].expand(-1, -1, D)))


def test_others_merge_equals_a_hand_computed_weighted_mean():
    vision = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]])
    centres = torch.tensor([[0, 1]])
    logits = torch.tensor([[[-5.0, 9.0], [7.0, -3.0],  # centre rows: ignored
                            [0.0, 0.0], [math.log(3.0), 0.0]]])  # token 2 -> 1/2, 1/2; token 3 -> 3/4, 1/4
    assignment = assign_others(logits, centres)
    assert torch.allclose(assignment[0], torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.75, 0.25]]))
    merged = merge_features(assignment, vision)[0]
    # centre 0: (x0 + x2 / 2 + 3 x3 / 4) / (1 + 1/2 + 3/4); centre 1: (x1 + x2 / 2 + x3 / 4) / (1 + 1/2 + 1/4)
    assert torch.allclose(merged, torch.tensor([[5.0 / 2.25, 1.0 / 2.25], [2.0 / 1.75, 2.0 / 1.75]]))


def test_others_merger_forward_matches_the_formula(vision):
    merger = _merger("others").eval()
    with torch.no_grad():
        out = merger(vision, 0.7)
        weights = _logits(merger, vision, out.centres, 0.7).softmax(dim=-1)  # [B, N, M]
    for b in range(B):
        centre_list = out.centres[b].tolist()
        for j, c in enumerate(centre_list):
            total, mass = vision[b, c].clone(), 1.0
            for i in range(N):
                if i not in centre_list:
                    total += weights[b, i, j] * vision[b, i]
                    mass += float(weights[b, i, j])
            assert torch.allclose(out.merged[b, j], total / mass, atol=1e-5), (b, j)


@pytest.mark.parametrize("assignment", ["all", "others"])
def test_gradients_reach_the_assignment_projections_and_the_scorer(vision, assignment):
    merger = _merger(assignment).train()
    out = merger(vision, 1.0)
    (out.merged * torch.randn_like(out.merged)).sum().backward()
    for name, parameter in [("assign_query", merger.assign_query.weight), ("assign_key", merger.assign_key.weight),
                            *merger.scorer.named_parameters()]:
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name


def test_unknown_assignment_refused():
    with pytest.raises(ValueError, match="assignment='centre': choose all or others"):
        LearnableTokenMerger(D, N, assignment="centre")


def test_config_key_validated_and_passed_to_the_merger():
    with pytest.raises(UsageError) as refused:
        load_config(None, ["--tiny_random", "merge_assignment=centre"])
    assert str(refused.value) == "merge_assignment 'centre': choose one of all, others (command line)"
    assert load_config(CONFIG, ["--tiny_random"]).merge_assignment == "all"
    from vlm.checkpoints import build_modules, load_backbone
    config = validate(VLMPruningConfig(tiny_random=True, tiny_image_size=56, pruner_d_internal=8,
                                       discriminator_d_internal=8, merge_assignment="others"))
    merger = build_modules(config, load_backbone(config))["merger"]
    assert merger.assignment == "others" and merger.num_centres == 8  # 16 tokens at 56 px, ratio 0.5


@torch.no_grad()
def test_cosine_similarity_is_scale_free_and_dot_is_not(vision):
    """`similarity="cosine"`: the same assignment for features scaled by 1,000 (the tiny LLaVA's projected
    features have norms of ~1,600), logits within ±1/τ; the seed's dot product saturates to one-hot rows."""
    cosine, dot = _merger("all", similarity="cosine").eval(), _merger("all").eval()
    small, large = cosine(vision, 1.0), cosine(vision * 1000, 1.0)
    assert torch.equal(small.centres, large.centres)
    assert torch.allclose(small.assignment, large.assignment, atol=1e-5)
    assert small.assignment.max() < 0.9  # a soft assignment at τ 1
    saturated = dot(vision * 1000, 1.0).assignment
    assert (saturated.max(dim=-1).values > 0.999).float().mean() > 0.9  # nearly every row one-hot
    from vlm.merger import cosine_similarity
    query, key = cosine.assign_query(vision * 1000), cosine.assign_key(vision[:, :3] * 1000)
    assert cosine_similarity(query, key).abs().max() <= 1 + 1e-6


def test_unknown_similarity_refused_and_config_key_passed():
    with pytest.raises(ValueError, match="similarity='l2': choose dot or cosine"):
        LearnableTokenMerger(D, N, similarity="l2")
    with pytest.raises(UsageError, match="merge_similarity 'l2': choose one of dot, cosine"):
        load_config(None, ["--tiny_random", "merge_similarity=l2"])
    from vlm.checkpoints import build_modules, load_backbone
    config = validate(VLMPruningConfig(tiny_random=True, tiny_image_size=56, pruner_d_internal=8,
                                       discriminator_d_internal=8, merge_similarity="cosine"))
    assert build_modules(config, load_backbone(config))["merger"].similarity == "cosine"
