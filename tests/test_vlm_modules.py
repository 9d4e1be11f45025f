"""vlm/ building blocks on CPU at LLaVA-1.5's token count (N = 576) and a tiny hidden size: the token
merger (both scorers), the pruner heads and keep mask, the discriminator, the temperature schedule
(issue 11 items 1-3 and the schedule of item 1)."""
import pytest
import torch

from vlm.discriminator import Discriminator
from vlm.merger import LearnableTokenMerger, merge_centres
from vlm.pruner_heads import MASKED_LOGIT, VisionPrunerHead, VisionPrunerHeadSimple, keep_mask
from vlm.schedule import temperature_at

pytestmark = pytest.mark.usefixtures("one_thread")
B, N, D, Q = 2, 576, 32, 7


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    vision = torch.randn(B, N, D, generator=generator)
    question = torch.randn(B, Q, D, generator=generator)
    question_mask = torch.ones(B, Q, dtype=torch.bool)
    question_mask[1, 4:] = False  # sample 1 has a shorter question
    return vision, question, question_mask


def _merger(question_aware, **kwargs):
    torch.manual_seed(1)
    return LearnableTokenMerger(D, N, question_aware=question_aware, **kwargs)


@pytest.mark.parametrize("question_aware", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_merger_shapes_and_assignment_rows(inputs, question_aware, training):
    vision, question, question_mask = inputs
    merger = _merger(question_aware).train(training)
    out = merger(vision, 0.5, question, question_mask)
    assert out.num_centres == 288
    assert out.merged.shape == (B, 288, D) and out.merged.dtype == vision.dtype
    assert out.assignment.shape == (B, N, 288) and out.centres.shape == (B, 288)
    assert out.kept.shape == (B,) and out.scores.shape == (B, N)
    torch.testing.assert_close(out.assignment.sum(-1), torch.ones(B, N))
    assert bool((out.centres.diff(dim=-1) > 0).all())  # distinct centres in raster order
    # merged centre j is the assignment-weighted mean of all tokens
    weights = out.assignment[0, :, 5] / out.assignment[0, :, 5].sum()
    torch.testing.assert_close(out.merged[0, 5], weights @ vision[0], rtol=1e-4, atol=1e-5)


def test_target_merge_tokens_overrides_the_ratio(inputs):
    merger = _merger(False, merge_ratio=0.9, target_merge_tokens=64)
    assert merger(inputs[0], 1.0).merged.shape == (B, 64, D)
    assert merge_centres(576, 0.25) == 144


def test_eval_is_deterministic_and_takes_the_top_scores(inputs):
    vision, question, question_mask = inputs
    merger = _merger(True).eval()
    first, second = (merger(vision, 0.1, question, question_mask) for _ in range(2))
    assert torch.equal(first.merged, second.merged) and torch.equal(first.centres, second.centres)
    top = merger.importance(vision, question, question_mask).topk(288, dim=-1).indices.sort(-1).values
    assert torch.equal(first.centres, top)
    merger.train()  # Gumbel-top-k samples: two training calls pick different centres
    assert not torch.equal(merger(vision, 1.0, question, question_mask).centres,
                           merger(vision, 1.0, question, question_mask).centres)


@pytest.mark.parametrize("kwargs,flag", [({"merge_ratio": 1.0}, "merge_ratio=1.0"),
                                         ({"target_merge_tokens": 576}, "target_merge_tokens=576"),
                                         ({"target_merge_tokens": 0}, "target_merge_tokens=0")])
def test_too_many_centres_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        LearnableTokenMerger(D, N, **kwargs)


def test_bad_merger_calls_are_refused(inputs):
    vision = inputs[0]
    with pytest.raises(ValueError, match="question_aware needs the question"):
        _merger(True)(vision, 1.0)
    with pytest.raises(ValueError, match=r"expects \[B, 576, 32\]"):
        _merger(False)(vision[:, :100], 1.0)


@pytest.mark.parametrize("progress,expected", [(0.0, 1.0), (0.25, 0.55), (0.5, 0.1), (0.9, 0.1), (1.0, 0.1)])
def test_temperature_schedule(progress, expected):
    assert temperature_at(progress) == pytest.approx(expected)


def test_temperature_schedule_refuses_bad_values():
    assert temperature_at(0.3, anneal_rate=0.0) == 0.1
    with pytest.raises(ValueError, match="progress=1.5"):
        temperature_at(1.5)
    with pytest.raises(ValueError, match="temperature_anneal_rate=2"):
        temperature_at(0.5, anneal_rate=2)


def test_keep_mask_eval_is_binary_and_thresholds_at_zero():
    logits = torch.tensor([[-2.0, -0.1, 0.0, 0.1, 3.0]])
    mask = keep_mask(logits, 0.5, training=False)
    assert mask.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]] and torch.equal(mask, (logits > 0).float())


def test_keep_mask_training_is_hard_with_a_soft_gradient():
    torch.manual_seed(0)
    logits = torch.zeros(4, 1000, requires_grad=True)
    mask = keep_mask(logits, 1.0, training=True)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < mask.mean().item() < 0.6  # logit 0: keep with probability 1/2
    mask.sum().backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature=0"):
        keep_mask(logits, 0, training=True)


@pytest.mark.parametrize("question_aware", [False, True])
def test_sparsity_loss_and_merged_features_reach_the_scorer(inputs, question_aware):
    vision, question, question_mask = inputs
    merger = _merger(question_aware).train()
    out = merger(vision, 0.5, question, question_mask)
    ((out.kept - out.num_centres) ** 2 * 1e-4).sum().backward()
    first = merger.scorer.vision_proj.weight.grad
    assert first is not None and first.abs().sum() > 0
    merger.zero_grad()
    merger(vision, 0.5, question, question_mask).merged.square().sum().backward()  # straight-through
    assert merger.scorer.vision_proj.weight.grad.abs().sum() > 0


def test_question_changes_only_the_question_aware_merger(inputs):
    vision, question, question_mask = inputs
    other = question.clone()
    other[:, :2] += 1.0
    padded = question.clone()
    padded[1, 4:] = 100.0  # masked question positions of sample 1
    for question_aware in (True, False):
        merger = _merger(question_aware).eval()
        base = merger(vision, 0.1, question, question_mask).merged
        changed = merger(vision, 0.1, other, question_mask).merged
        assert (base - changed).abs().max() > 1e-4 if question_aware else torch.equal(base, changed)
        torch.testing.assert_close(merger(vision, 0.1, padded, question_mask).merged[1], base[1])


def test_untrained_heads_keep_every_token_and_mask_padding(inputs):
    vision, question, question_mask = inputs
    vision_mask = torch.ones(B, N, dtype=torch.bool)
    vision_mask[0, :10] = False
    for head in (VisionPrunerHead(D), VisionPrunerHeadSimple(D)):
        logits = head(vision, question, question_mask, vision_mask)
        assert logits.shape == (B, N)
        assert bool((logits[0, :10] == MASKED_LOGIT).all())
        assert keep_mask(logits, 0.1, training=False).sum().item() == B * N - 10


def test_head_without_question_tokens_is_finite(inputs):
    vision, question, _ = inputs
    no_question = torch.zeros(B, Q, dtype=torch.bool)
    assert torch.isfinite(VisionPrunerHead(D)(vision, question, no_question)).all()
    assert torch.isfinite(VisionPrunerHead(D)(vision, question[:, :0], no_question[:, :0])).all()
    with pytest.raises(ValueError, match="pruner_num_heads=3"):
        VisionPrunerHead(D, d_internal=512, num_heads=3)


def test_discriminator_on_layers_of_different_lengths():
    torch.manual_seed(0)
    lengths = [40, 40, 30, 30, 20, 20]  # hidden_states of a hard-pruned forward: shorter after pruning
    hidden = [torch.randn(B, length, D) for length in lengths]
    masks = [torch.ones(B, length, dtype=torch.bool) for length in lengths]
    for mask in masks:
        mask[1, :5] = False  # left padding of sample 1
    discriminator = Discriminator(D)
    logits = discriminator(hidden, masks)
    assert logits.shape == (B,)
    changed = [h.clone() for h in hidden]
    changed[-1][1, :5] = float("nan")  # masked positions of a read layer
    changed[-3][1, 2] = 1e6
    changed[0][:] = 7.0  # layer 0 is not read (layers -1, -3, -5 of 6)
    assert torch.equal(discriminator(changed, masks), logits)
    changed[-5][0, 3, 0] += 1.0  # one channel of an unmasked position of a read layer (a shift of every channel
    # alike would vanish in the LayerNorm after pooling: only rounding would tell it apart)
    scored = discriminator(changed, masks)
    assert (scored[0] - logits[0]).abs() > 1e-4 and scored[1] == logits[1]  # only sample 0 changed
    with pytest.raises(ValueError, match=r"layers \(-1, -3, -5\) need more than the 4"):
        discriminator(hidden[:4], masks[:4])


def test_stages_on_a_tiny_llava():
    """Each stage on a tiny random LLaVA: projected features -> merger (question-aware, question from the
    LLM's input embeddings) -> keep head on the merged tokens; discriminator on the model's hidden states."""
    from vlm.llava import build_llava, image_features, llava_parts, question_mask, tiny_llava_config
    torch.manual_seed(0)
    image_token, pad = 99, 0
    model = build_llava(tiny_llava_config(100, image_token, pad, num_layers=6))
    parts = llava_parts(model)
    text = torch.randint(1, 99, (B, 9))
    input_ids = torch.cat([text[:, :2], torch.full((B, N), image_token), text[:, 2:]], dim=1)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :2], attention_mask[1, :2] = pad, 0  # sample 1 left-padded by 2
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "pixel_values": torch.randn(B, 3, 336, 336)}
    with torch.no_grad():
        vision = image_features(model, batch["pixel_values"])
        assert vision.shape == (B, N, D)
        question = parts.language_model.embed_tokens(input_ids)  # [B, S, D], masked to the question
        mask = question_mask(batch, image_token)
        assert mask.sum(-1).tolist() == [9, 7]
        out = _merger(True).eval()(vision, 0.1, question, mask)
        assert out.merged.shape == (B, 288, D)
        logits = VisionPrunerHead(D)(out.merged, question, mask)
        assert logits.shape == (B, 288)
        hidden = model(**batch, output_hidden_states=True).hidden_states
        assert len(hidden) == 7 and hidden[-1].shape == (B, N + 9, D)
        masks = [attention_mask.bool()] * len(hidden)
        assert Discriminator(D)(hidden, masks).shape == (B,)


def test_warmup_cosine_factors():
    from vlm.schedule import warmup_cosine
    assert [warmup_cosine(s, 100, 4) for s in (0, 1, 3)] == pytest.approx([0.25 * 1.0, 0.5 * 0.99975, 0.99778],
                                                                          abs=1e-5)
    assert warmup_cosine(50, 100, 4) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 4) == pytest.approx(0.0) and warmup_cosine(150, 100, 4) == pytest.approx(0.0)
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)  # no warmup
