"""The pruned LLaVA forward (issue 11 items 2, 5, 7): origin / train / soft / hard, KV cache, generate,
left padding, hooks, token budget. CPU, tiny random LLaVA (576 vision tokens, 32 layers at hidden 32), fp32."""
import pytest
import torch

from vlm.layer_pruner import LayerSpecificPruner
from vlm.llava import build_llava, tiny_llava_config
from vlm.merger import LearnableTokenMerger
from vlm.pruned_forward import equivalent_token_budget, generate_counted, pruned_forward, pruned_generate

VOCAB, IMAGE, PAD, N = 64, 63, 0, 576


class RankDecider:
    """Fixed-mask decider: keeps the vision slots whose rank among the sample's still-kept vision tokens is
    in `keep_rank(layer, rank)`, or (sign_layers) those whose hidden state's first feature is above the
    sample's mean over its vision tokens, so samples keep different counts. Batch-independent: a sample
    decides the same alone or in a batch."""

    def __init__(self, layers, keep_rank=lambda layer, rank: rank % 2 == 0, sign_layers=()):
        self.layers, self.keep_rank, self.sign_layers, self.calls = list(layers), keep_rank, set(sign_layers), []

    def decide(self, layer, hidden, vision_index, vision_valid, question_hidden, question_mask, training,
               temperature):
        self.calls.append((layer, hidden.shape[1], int(question_mask.sum())))
        if layer in self.sign_layers:
            first = hidden.gather(1, vision_index[..., None].expand(-1, -1, hidden.shape[-1]))[..., 0]
            valid = vision_valid.float()
            keep = first > (first * valid).sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True)
        else:
            rank = vision_valid.long().cumsum(dim=1) - 1
            keep = self.keep_rank(layer, rank)
        return (keep & vision_valid).float()


@pytest.fixture(scope="module")
def model(one_thread):
    torch.manual_seed(0)
    return build_llava(tiny_llava_config(VOCAB, IMAGE, PAD))


def make_batch(prompt_lengths, answer_length=2, seed=1):
    """Left-padded batch: 2 text tokens, N image placeholders, prompt tokens, answer tokens (labelled)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(1, IMAGE, (2,), generator=generator), torch.full((N,), IMAGE),
                       torch.randint(1, IMAGE, (length + answer_length,), generator=generator)])
            for length in prompt_lengths]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], attention[b, width - len(row):] = row, 1
        if answer_length:
            labels[b, width - answer_length:] = row[-answer_length:]
    pixels = torch.randn(len(rows), 3, 336, 336, generator=generator)
    return dict(input_ids=ids, attention_mask=attention, labels=labels, pixel_values=pixels)


def sample(batch, b):
    """Sample b of a batch alone, its left padding removed."""
    start = int((batch["attention_mask"][b] == 0).sum())
    return {key: value[b:b + 1, start:] if key != "pixel_values" else value[b:b + 1]
            for key, value in batch.items()}


def answer_logits(output):
    return output.logits[output.labels != -100]


@torch.no_grad()
def test_keep_all_hard_equals_origin(model):
    batch = make_batch([3, 6])
    keep_all = RankDecider([10, 20, 31], keep_rank=lambda layer, rank: rank >= 0)
    origin = pruned_forward(model, batch, "origin", output_hidden_states=True)
    hard = pruned_forward(model, batch, "hard", decider=keep_all, output_hidden_states=True)
    assert [call[0] for call in keep_all.calls] == [10, 20, 31]
    text = batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)
    assert hard.logits.shape == origin.logits.shape
    assert (hard.logits - origin.logits)[text].abs().max() <= 1e-5
    assert hard.vision_tokens_per_layer == [float(N)] * 32
    valid = batch["attention_mask"].bool()
    assert len(hard.hidden_states) == len(origin.hidden_states) == 33
    for layer in (10, 31, 32):  # inputs of layers 10 and 31, final normed output: as Hugging Face's
        assert (hard.hidden_states[layer] - origin.hidden_states[layer])[valid].abs().max() <= 1e-5


@torch.no_grad()
def test_hard_equals_soft_with_binary_mask(model):
    batch = make_batch([3, 6])
    decider = RankDecider([10, 20, 31], keep_rank=lambda layer, rank: rank % (2 if layer == 20 else 3) == 0,
                          sign_layers=[10])
    soft = pruned_forward(model, batch, "soft", decider=decider, output_hidden_states=True)
    hard = pruned_forward(model, batch, "hard", decider=decider, output_hidden_states=True)
    assert soft.logits.shape[1] == batch["input_ids"].shape[1] and hard.logits.shape[1] < 80
    assert (answer_logits(hard) - answer_logits(soft)).abs().max() <= 1e-4
    assert soft.vision_tokens_per_layer == hard.vision_tokens_per_layer
    train = pruned_forward(model, batch, "train", decider=decider)  # log(keep + 1e-6) bias: ~ the -inf one
    assert (answer_logits(train) - answer_logits(soft)).abs().max() <= 1e-4
    kept_10 = hard.vision_tokens_per_layer[10]
    assert 200 < kept_10 < 380 and hard.vision_tokens_per_layer[9] == N  # signs: about half, per sample
    # hard: later layers really run on fewer tokens; soft: the same length, dropped tokens masked out
    assert hard.hidden_states[31].shape[1] < hard.hidden_states[20].shape[1] < hard.hidden_states[10].shape[1]
    assert hard.hidden_states[10].shape[1] < hard.hidden_states[9].shape[1] == soft.hidden_states[31].shape[1]
    assert len(hard.hidden_states) == len(hard.hidden_masks) == 33
    for layer in (10, 20, 31):
        assert torch.equal(hard.hidden_masks[layer].sum(1), soft.hidden_masks[layer].sum(1))


@torch.no_grad()
def test_generate_with_and_without_cache_hard(model):
    batch = make_batch([2, 5], answer_length=0)
    decider = RankDecider([10, 20, 31], keep_rank=lambda layer, rank: rank % 2 == 0, sign_layers=[10])
    cached = pruned_generate(model, batch, "hard", decider=decider, max_new_tokens=3, use_cache=True)
    uncached = pruned_generate(model, batch, "hard", decider=decider, max_new_tokens=3, use_cache=False)
    assert cached.shape == (2, 3)
    assert torch.equal(cached, uncached)
    soft = pruned_generate(model, batch, "soft", decider=decider, max_new_tokens=3, use_cache=True)
    assert torch.equal(soft, cached)  # soft decode: full caches, dropped keys masked per layer
    merger = LearnableTokenMerger(32, N, target_merge_tokens=100, d_internal=16, question_aware=True).eval()
    merged = [pruned_generate(model, batch, "hard", decider=decider, merger=merger, max_new_tokens=3,
                              use_cache=use_cache, temperature=0.1) for use_cache in (True, False)]
    assert torch.equal(merged[0], merged[1])
    plain = pruned_generate(model, batch, "origin", max_new_tokens=3)
    reference = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"], max_new_tokens=3, do_sample=False,
                               eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(plain, reference[:, -3:])  # the hooked cache path = Hugging Face generate
    output = pruned_forward(model, batch, "hard", decider=decider, use_cache=True)
    lengths = [output.past_key_values.layers[i].keys.shape[2] for i in (9, 10, 20, 31)]
    assert lengths[0] > lengths[1] > lengths[2] > lengths[3]  # each layer holds its own cache length


@pytest.mark.parametrize("mode", ["hard", "soft"])
@torch.no_grad()
def test_left_padded_batch_equals_samples_alone(model, mode):
    batch = make_batch([1, 4, 2, 7])
    decider = RankDecider([10, 20], keep_rank=lambda layer, rank: rank % 3 == 0, sign_layers=[10])
    together = pruned_forward(model, batch, mode, decider=decider)
    for b in range(4):
        alone = pruned_forward(model, sample(batch, b), mode, decider=decider)
        rows = together.labels[b] != -100
        assert int(rows.sum()) == 2
        assert (together.logits[b][rows] - answer_logits(alone)).abs().max() <= 1e-4
        assert together.keep[10][b].sum() == alone.keep[10][0].sum()
    counts = together.keep[10].sum(dim=1)
    assert len(set(counts.tolist())) > 1  # samples keep different counts: the hard path re-pads


def test_hooks_removed_after_use_and_after_an_exception(model):
    def hooks():
        return sum(len(layer._forward_pre_hooks) for layer in model.model.language_model.layers)

    batch = make_batch([2])
    with torch.no_grad():
        pruned_forward(model, batch, "hard", decider=RankDecider([10]))
    assert hooks() == 0

    class Failing(RankDecider):
        def decide(self, *args, **kwargs):
            raise RuntimeError("decider failed")

    with pytest.raises(RuntimeError, match="decider failed"), torch.no_grad():
        pruned_forward(model, batch, "soft", decider=Failing([20]))
    assert hooks() == 0


def test_pruning_layer_beyond_depth_is_refused(model):
    with pytest.raises(ValueError, match="pruning_layers"):
        LayerSpecificPruner(32, num_layers=32, pruning_layers=(10, 20, 32))
    with pytest.raises(ValueError, match="pruning_layers"):
        pruned_forward(model, make_batch([2]), "hard", decider=RankDecider([10, 32]))
    with pytest.raises(ValueError, match="mode"):
        pruned_forward(model, make_batch([2]), "prune")


@torch.no_grad()
def test_vision_tokens_per_layer_and_equivalent_budget(model):
    """VLM.md: 576 tokens for 10 of 32 layers, then 144 -> T̄ = 279."""
    decider = RankDecider([10], keep_rank=lambda layer, rank: rank < 144)
    output = pruned_forward(model, make_batch([2, 3]), "hard", decider=decider)
    assert output.vision_tokens_per_layer == [576.0] * 10 + [144.0] * 22
    assert equivalent_token_budget(output.vision_tokens_per_layer) == 279.0
    assert output.keep[10].shape == (2, N) and output.keep[10].sum(dim=1).tolist() == [144.0, 144.0]
    with pytest.raises(ValueError, match="vision_tokens_per_layer"):
        equivalent_token_budget([])
    drop_all = RankDecider([4, 8], keep_rank=lambda layer, rank: rank < 0)
    output = pruned_forward(model, make_batch([2]), "hard", decider=drop_all)
    assert output.vision_tokens_per_layer == [576.0] * 4 + [0.0] * 28
    assert equivalent_token_budget(output.vision_tokens_per_layer) == 72.0
    assert output.keep[8].shape == (1, 0) and output.logits.shape[1] == 2 + 2 + 2
    for use_cache in (True, False):  # generation counts its own prefill: the same numbers, no second forward
        tokens, counts = generate_counted(model, make_batch([2, 3]), "hard", decider=decider, max_new_tokens=2,
                                          use_cache=use_cache)
        assert tokens.shape == (2, 2) and counts == [576.0] * 10 + [144.0] * 22
    assert generate_counted(model, make_batch([2]), "origin", max_new_tokens=1)[1] == [576.0] * 32


@torch.no_grad()
def test_merge_shrinks_the_image_span_and_keeps_labels_aligned(model):
    batch = make_batch([3, 5])
    merger = LearnableTokenMerger(32, N, merge_ratio=0.5, d_internal=16).eval()
    soft = pruned_forward(model, batch, "soft", merger=merger)
    hard = pruned_forward(model, batch, "hard", merger=merger, decider=RankDecider([10]))
    assert soft.logits.shape[1] == batch["input_ids"].shape[1] - (N - 288)
    assert soft.vision_tokens_per_layer[0] == 288.0 and hard.vision_tokens_per_layer[10] == 144.0
    assert torch.equal(soft.labels[soft.labels != -100], batch["labels"][batch["labels"] != -100])
    assert torch.equal(hard.labels[hard.labels != -100], batch["labels"][batch["labels"] != -100])


@torch.no_grad()
def test_merged_prompt_positions_recount_or_original(model):
    """recount (the seed's): 0.. over the shorter prompt; original: centre j at span start + its token
    index, every text token at its own position (left padding included)."""
    from vlm.hard_drop import padding_positions
    from vlm.pruned_forward import _prompt
    batch = make_batch([3, 5])
    recount = _prompt(model, batch, LearnableTokenMerger(32, N, merge_ratio=0.5, d_internal=16).eval(), 0.1)
    assert recount.positions is None  # _prefill counts 0.. over the valid tokens
    merger = LearnableTokenMerger(32, N, merge_ratio=0.5, d_internal=16, positions="original").eval()
    prompt = _prompt(model, batch, merger, 0.1)
    original = padding_positions(batch["attention_mask"].bool())
    for b in range(2):
        start = int(original[b][batch["input_ids"][b] == IMAGE][0])
        assert prompt.positions[b][prompt.vision[b]].tolist() == (start + prompt.merge.centres[b]).tolist()
        text_after = prompt.positions[b][prompt.valid[b] & ~prompt.vision[b]][-2:]  # the last two text tokens
        assert text_after.tolist() == original[b][-2:].tolist()
    with pytest.raises(ValueError, match="positions='middle'"):
        LearnableTokenMerger(32, N, positions="middle")


def test_train_mode_gradients_reach_the_pruner_heads(model):
    torch.manual_seed(0)
    batch = make_batch([3, 4])
    pruner = LayerSpecificPruner(32, 32, pruning_layers=(10, 20, 31), d_internal=16, num_heads=2).train()
    output = pruned_forward(model, batch, "train", decider=pruner, temperature=1.0)
    logits, labels = output.logits[:, :-1], output.labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    for layer in ("10", "20", "31"):
        grad = pruner.heads[layer].mlp[-1].weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_left_padded_hard_prefill_runs_in_float64(model):
    """A padded batch's 4-D mask in a float64 model: -inf keys become float64's lowest value (was: a
    RuntimeError converting float64's lowest value to the float32 bias, found on an H100), and the float64
    hard prefill equals the float32 one to float32 rounding."""
    batch = make_batch([3, 6])
    decider = RankDecider([10, 20], keep_rank=lambda layer, rank: rank % 3 == 0)
    fp32 = pruned_forward(model, batch, "hard", decider=decider)
    wide = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    fp64 = pruned_forward(model.double(), wide, "hard", decider=decider)
    model.float()
    assert fp64.logits.dtype == torch.float64
    assert (fp64.logits - fp32.logits.double()).abs().max() <= 1e-4
    assert fp64.vision_tokens_per_layer == fp32.vision_tokens_per_layer
