"""Evaluation side of the VLM token pruning (issue 11 items 5, 6, 9): baselines, token budgets, cost counting,
the eval CLI and the speed benchmark at tiny size."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from vlm.baselines import (FastVDrop, RandomDrop, keep_counts_for_budget, top_k_keep,  # noqa: E402
                           vision_tokens_per_layer)
from vlm.cost import count_flops, kv_cache_bytes, kv_cache_lengths  # noqa: E402
from vlm.llava import build_llava, tiny_llava_config  # noqa: E402

VOCAB, IMAGE_ID, PAD_ID = 40, 3, 0


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_llava(tiny_llava_config(VOCAB, IMAGE_ID, PAD_ID))


def test_top_k_keep_respects_validity_and_count():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.6]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    keep = top_k_keep(scores, valid, 2)
    assert keep.tolist() == [[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    assert top_k_keep(scores, valid, 3)[1].tolist() == [1.0, 1.0, 0.0, 0.0]  # only 2 valid


def test_random_drop_keeps_k_per_sample_and_is_seeded():
    index = torch.arange(50).expand(4, 50)
    valid = torch.ones(4, 50, dtype=torch.bool)
    valid[3, 10:] = False
    hidden = torch.zeros(4, 60, 8)
    first = RandomDrop([5, 9], [20, 7], seed=3)
    keep = first.decide(5, hidden, index, valid)
    assert keep.sum(1).tolist() == [20.0, 20.0, 20.0, 10.0]
    assert keep[3, 10:].sum() == 0
    assert not torch.equal(keep[0], keep[1])                   # drawn per sample
    assert first.decide(9, hidden, index, valid).sum(1).tolist() == [7.0, 7.0, 7.0, 7.0]
    again = RandomDrop([5, 9], [20, 7], seed=3)
    assert torch.equal(again.decide(5, hidden, index, valid), keep)
    first.reset()
    assert torch.equal(first.decide(5, hidden, index, valid), keep)
    assert not torch.equal(RandomDrop([5, 9], [20, 7], seed=4).decide(5, hidden, index, valid), keep)
    with pytest.raises(ValueError, match="keep_tokens"):
        RandomDrop([5, 9], [20], seed=0)


def _eager_attention_row(model, hidden, layer, key_mask, query):
    """Attention weights of decoder layer `layer` from HF's own eager attention: row `query`, mean over heads.
    key_mask bool [B, S] (False = padding key)."""
    language_model = model.model.language_model
    batch, length, _ = hidden.shape
    decoder_layer = language_model.layers[layer]
    normed = decoder_layer.input_layernorm(hidden)
    embeddings = language_model.rotary_emb(normed, torch.arange(length).expand(batch, -1))
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None] & key_mask[:, None, :]
    bias = torch.zeros(batch, 1, length, length).masked_fill(~causal[:, None], float("-inf"))
    attention = decoder_layer.self_attn
    saved = attention.config._attn_implementation
    attention.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            _, weights = attention(hidden_states=normed, position_embeddings=embeddings, attention_mask=bias)
    finally:
        attention.config._attn_implementation = saved
    return weights[:, :, query].mean(1)                                   # [B, S]


def test_fastv_keeps_top_k_of_the_eager_attention_row(tiny_model):
    """The row FastVDrop recomputes equals the weights of the layer's own eager attention (HF code path),
    and the kept tokens are exactly the top-k of that row at the vision positions."""
    torch.manual_seed(1)
    batch, length, layer = 2, 30, 2
    hidden = torch.randn(batch, length, tiny_model.config.text_config.hidden_size)
    row = _eager_attention_row(tiny_model, hidden, layer, torch.ones(batch, length, dtype=torch.bool), -1)
    vision_index = torch.arange(4, 24).expand(batch, -1)
    valid = torch.ones(batch, 20, dtype=torch.bool)
    fastv = FastVDrop(layer=layer, keep_tokens=6, model=tiny_model)
    assert torch.allclose(fastv.attention_row(hidden), row, atol=1e-6)
    keep = fastv.decide(layer, hidden, vision_index, valid)
    expected = torch.zeros(batch, 20)
    expected.scatter_(1, row[:, 4:24].topk(6, dim=1).indices, 1.0)
    assert torch.equal(keep, expected)
    with pytest.raises(ValueError, match="layer=40"):
        FastVDrop(layer=40, keep_tokens=6, model=tiny_model)


def test_fastv_queries_the_last_question_token_and_skips_left_padding(tiny_model):
    """Sample 1 has 3 padding slots; positions 28-29 are teacher-forced answer tokens: the query is position 27
    (the last question token) and padding keys get no weight."""
    torch.manual_seed(2)
    batch, length, layer = 2, 30, 2
    hidden = torch.randn(batch, length, tiny_model.config.text_config.hidden_size)
    real = torch.ones(batch, length, dtype=torch.bool)
    real[1, :3] = False
    question = torch.zeros(batch, length, dtype=torch.bool)
    question[:, 24:28] = True
    question[0, 3] = question[1, 3] = True                                  # bos
    question[0, :3] = True
    row = _eager_attention_row(tiny_model, hidden, layer, real, 27)
    vision_index = torch.arange(4, 24).expand(batch, -1)
    valid = torch.ones(batch, 20, dtype=torch.bool)
    keep = FastVDrop(layer=layer, keep_tokens=5, model=tiny_model).decide(
        layer, hidden, vision_index, valid, question_hidden=hidden, question_mask=question)
    expected = torch.zeros(batch, 20)
    expected.scatter_(1, row[:, 4:24].topk(5, dim=1).indices, 1.0)
    assert torch.equal(keep, expected)
    unpadded = FastVDrop(layer=layer, keep_tokens=5, model=tiny_model).attention_row(hidden)
    assert not torch.allclose(unpadded[1], row[1], atol=1e-4)               # the query and padding matter


@pytest.mark.parametrize("target,tokens,layers", [(192, 576, [10, 20, 31]), (128, 288, [10, 20, 31]),
                                                   (91.0, 288, [10, 20, 31]), (64, 576, [2]), (144, 576, [2, 8])])
def test_keep_counts_reach_the_budget_within_one_token(target, tokens, layers):
    keep = keep_counts_for_budget(target, tokens, layers, 32)
    per_layer = vision_tokens_per_layer(tokens, layers, keep, 32)
    assert abs(sum(per_layer) / 32 - target) <= 1.0
    assert keep == sorted(keep, reverse=True)


def test_budget_below_the_reachable_minimum_names_it():
    """288 centres, layers [10, 20, 31]: T̄ cannot go below 288 * 10 / 32 = 90."""
    with pytest.raises(ValueError, match=r"\[90, 288\]"):
        keep_counts_for_budget(64, 288, [10, 20, 31], 32)
    assert vision_tokens_per_layer(576, [2], [64], 4) == [576.0, 576.0, 64.0, 64.0]


def test_flops_and_kv_bytes_of_a_plain_forward_follow_the_sequence_length(tiny_model):
    lm = tiny_model.model.language_model
    short, long_ = torch.randint(5, VOCAB, (1, 50)), torch.randint(5, VOCAB, (1, 100))
    assert count_flops(lambda: lm(input_ids=long_)) > 1.9 * count_flops(lambda: lm(input_ids=short))
    with torch.no_grad():
        cache = lm(input_ids=short, use_cache=True).past_key_values
    config = tiny_model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    assert kv_cache_bytes(cache) == 2 * 32 * 50 * config.num_key_value_heads * head_dim * 4
    assert kv_cache_lengths(cache) == [50] * 32
    assert kv_cache_bytes(None) == 0


def _prompt_batch(model, size=2, seed=0):
    from vlm.data import VQACollator, cifar10_vqa, cifar10_vqa_tokenizer
    tokenizer = cifar10_vqa_tokenizer()
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    samples = cifar10_vqa(images, torch.arange(size), seed)[1::2]          # "is there a ...?" questions
    return VQACollator(tokenizer, 576, 336, with_answers=False)(samples)


def test_flops_and_kv_bytes_of_a_real_drop(tiny_model):
    """Soft only masks attention (same FLOPs as origin); hard drops 576 -> 100 -> 20 tokens at layers 2 and 10,
    so it counts fewer FLOPs and leaves a smaller KV cache (layers hold caches of their own length)."""
    from vlm.evaluate import prefill_cost
    batch = _prompt_batch(tiny_model)
    costs = {mode: prefill_cost(tiny_model, batch, mode, decider=RandomDrop([2, 10], [100, 20], seed=0),
                                warmup=0, iters=1) for mode in ("origin", "soft", "hard")}
    assert costs["soft"]["flops"] == costs["origin"]["flops"]
    assert costs["hard"]["flops"] < 0.5 * costs["origin"]["flops"]
    assert costs["soft"]["kv_cache_bytes"] == costs["origin"]["kv_cache_bytes"]
    config = tiny_model.config.text_config
    per_token = 2 * batch["input_ids"].shape[0] * config.hidden_size * 4          # K and V, fp32, all heads
    length = batch["input_ids"].shape[1]
    dropped = 2 * 0 + 8 * (576 - 100) + 22 * (576 - 20)                           # per layer, summed
    assert costs["origin"]["kv_cache_bytes"] == 32 * length * per_token
    assert costs["hard"]["kv_cache_bytes"] == (32 * length - dropped) * per_token
    assert all(c["prefill_latency_ms"] > 0 for c in costs.values())


EXPECTED_KEYS = {"accuracy_baseline", "accuracy_soft", "accuracy_hard", "exact_match", "keep_ratio_merge",
                 "tokens_per_stage", "vision_tokens_per_layer", "equivalent_token_budget", "flops",
                 "prefill_latency_ms", "kv_cache_bytes", "baselines", "setup"}


def test_cli_two_modes_writes_every_key_with_null_for_modes_not_run(tmp_path, capsys):
    from eval_vlm_pruning import main
    out = tmp_path / "results.json"
    assert main(["--tiny_random", "--modes", "origin", "hard", "--baselines", "random", "--limit", "2",
                 "--max_new_tokens", "1", "--latency_iters", "1", "--warmup", "0", "--device", "cpu",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr()
    # the bar counts (2 modes + random x 1 budget x hard) x 1 batch; the table: origin, hard, random hard
    assert "3/3" in printed.err and "random T̄=" in printed.err
    table = printed.out.splitlines()
    assert table[0].split() == ["mode", "accuracy", "T̄", "GFLOPs", "prefill", "ms", "KV", "MB"]
    assert [line.split()[0] for line in table[1:4]] == ["origin", "hard", "random"]
    assert table[1].split()[2] == "576.0" and table[3].split()[4] == "hard"
    assert table[4] == f"wrote {out}"
    results = json.loads(out.read_text())
    assert EXPECTED_KEYS <= set(results)
    assert results["accuracy_soft"] is None and results["accuracy_hard"] is not None
    assert set(results["flops"]) == {"origin", "hard"}
    assert results["kv_cache_bytes"]["hard"] < results["kv_cache_bytes"]["origin"]
    assert results["setup"]["samples"] == 2 and results["setup"]["pruning_layers"] == [10, 20, 31]
    # the --tiny_random merger has the seed's settings, recorded so a results file says how it merged
    assert results["setup"]["merge"] == {"similarity": "dot", "assignment": "all", "positions": "recount"}
    baseline, = results["baselines"]
    assert baseline["name"] == "random" and set(baseline["flops"]) == {"hard"}


@pytest.mark.slow
def test_cli_tiny_random_writes_every_key(tmp_path):
    from eval_vlm_pruning import main
    out = tmp_path / "results.json"
    assert main(["--tiny_random", "--modes", "origin", "soft", "hard", "--baselines", "random", "fastv",
                 "--limit", "2", "--batch_size", "2", "--max_new_tokens", "2", "--latency_iters", "1",
                 "--warmup", "0", "--device", "cpu", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert EXPECTED_KEYS <= set(results)
    assert all(0.0 <= results[k] <= 1.0 for k in ("accuracy_baseline", "accuracy_soft", "accuracy_hard"))
    assert results["keep_ratio_merge"] == pytest.approx(0.5)                    # 288 of 576 centres
    assert results["tokens_per_stage"]["hard"]["vision_tower"] == 576
    assert results["tokens_per_stage"]["hard"]["llm_input"] == 288
    assert results["equivalent_token_budget"]["origin"] == 576
    assert results["equivalent_token_budget"]["hard"] <= 288
    # the untrained heads keep (almost) every merged token, so hard <= soft; merging halves the LLM's tokens
    assert results["flops"]["hard"] <= results["flops"]["soft"] < results["flops"]["origin"]
    assert results["kv_cache_bytes"]["hard"] < results["kv_cache_bytes"]["origin"]
    target = results["equivalent_token_budget"]["hard"]
    assert [b["name"] for b in results["baselines"]] == ["random", "fastv"]
    for baseline in results["baselines"]:
        assert set(baseline["equivalent_token_budget"]) == {"soft", "hard"}
        assert abs(baseline["equivalent_token_budget"]["hard"] - target) <= 1.0   # same T̄ within a token
        assert "accuracy_hard" in baseline and "accuracy_soft" in baseline


def test_limit_defaults_to_8_with_tiny_random_and_64_otherwise(tmp_path):
    from eval_vlm_pruning import parse_args
    out = str(tmp_path / "r.json")
    assert parse_args(["--tiny_random", "--output", out]).limit == 8
    checkpoint = tmp_path / "c.pt"
    checkpoint.write_bytes(b"")
    assert parse_args(["--checkpoint", str(checkpoint), "--output", out]).limit == 64
    assert parse_args(["--tiny_random", "--limit", "3", "--no_progress", "--output", out]).limit == 3


def test_summary_table_rows_of_modes_and_baselines():
    from vlm.evaluate import summary_table
    costs = {"equivalent_token_budget": {"hard": 100.04}, "flops": {"hard": 2.5e9},
             "prefill_latency_ms": {"hard": 12.34}, "kv_cache_bytes": {"hard": 3.2e6}}
    results = {"accuracy_baseline": None, "accuracy_soft": None, "accuracy_hard": 0.5, **costs,
               "baselines": [{"name": "fastv", "target_budget": 100.04, "accuracy_hard": 0.25, **costs},
                             {"name": "random", "target_budget": 5, "skipped": "below the reachable minimum"}]}
    assert summary_table(results).splitlines() == [
        "mode                accuracy       T̄  GFLOPs  prefill ms  KV MB",  # T̄: 1 column on a terminal
        "hard                   0.500  100.04     2.5        12.3    3.2",  # 2 decimals where 1 would round
        "fastv @ T̄ 100 hard     0.250  100.04     2.5        12.3    3.2",
        "random @ T̄ 5         skipped"]


def _bad_checkpoint(path):
    """A train_vlm_pruning.py checkpoint whose model fingerprint is not the tiny model's (another model)."""
    from utils import checkpoint
    from vlm.config import VLMPruningConfig
    fingerprint = {"vocab_size": 32064, "hidden_size": 4096, "num_layers": 32}
    checkpoint.save(str(path), {"format": "vlm-pruning/1", "config": VLMPruningConfig(tiny_random=True).to_dict(),
                                "fingerprint": fingerprint, "step": 1, "modules": {}, "optimizers": {}, "rng": {}})


@pytest.mark.parametrize("flags,named", [
    (["--tiny_random", "--modes", "origin", "sharp"], "--modes sharp"),
    (["--tiny_random", "--data", "missing.jsonl"], "--data missing.jsonl"),
    (["--checkpoint", "missing.pt"], "--checkpoint missing.pt"),
    (["--checkpoint", "OTHER"], "checkpoint of another model"),
    (["--tiny_random", "--baselines", "tome"], "--baselines tome"),
    (["--tiny_random", "--modes", "origin", "--baselines", "random"], "--baselines"),
    (["--tiny_random", "--budgets", "10", "--baselines", "fastv", "--device", "cpu"], "--budgets 10"),
    (["--tiny_random", "--limit", "0"], "--limit 0"),
])
def test_bad_input_exits_2_with_one_line_and_no_file(tmp_path, capsys, flags, named):
    from eval_vlm_pruning import main
    if "OTHER" in flags:
        _bad_checkpoint(tmp_path / "other.pt")
        flags = [str(tmp_path / "other.pt") if f == "OTHER" else f for f in flags]
    out = tmp_path / "results.json"
    assert main(flags + ["--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not out.exists()


def test_speed_benchmark_tiny_reaches_each_budget_and_saves_kv(tmp_path):
    """benchmarks/vlm_speed.py --tiny: every hard row reaches its target T̄ within one token, with fewer FLOPs
    and a smaller KV cache than origin; the JSON holds the rows the table prints."""
    from benchmarks.vlm_speed import SETTINGS, main
    out = tmp_path / "speed.json"
    assert main(["--tiny", "--batch_sizes", "1", "--warmup", "0", "--iters", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    origin, *hard = results["rows"]
    assert origin["setting"] == "origin" and origin["equivalent_token_budget"] == 576
    assert len(hard) == sum(len(targets) for *_, targets in SETTINGS)
    for row in hard:
        assert abs(row["equivalent_token_budget"] - row["target_budget"]) <= 1.0, row
        assert row["flop_ratio"] > 1.5 and row["kv_cache_mb"] < origin["kv_cache_mb"]
        assert row["speedup"] == pytest.approx(origin["latency_ms"] / row["latency_ms"])
        assert 0 < row["overhead_pct"] < 100
    assert {r["target_budget"] for r in hard} == {192, 128, 64}
    assert "90" in results["note"]


def test_answers_are_cut_at_the_first_eos():
    from vlm.data import cifar10_vqa_tokenizer
    from vlm.evaluate import decode_answers
    words = cifar10_vqa_tokenizer()
    ids = [[words.index["yes"], words.eos_token_id, words.index["no"]], [words.index["cat"], words.index["dog"], 0]]
    assert decode_answers(words, torch.tensor(ids)) == ["yes", "cat dog"]

    class HFLike:                                    # the part of a Hugging Face tokenizer decode_answers uses
        eos_token_id = 2

        def decode(self, ids, skip_special_tokens=False):
            return " " + "-".join(map(str, ids))
    assert decode_answers(HFLike(), torch.tensor([[7, 8, 2, 9], [5, 6, 7, 8]])) == ["7-8", "5-6-7-8"]
