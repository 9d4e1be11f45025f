"""Each primitive of the pruned prefill's decision path, captured alone in a CUDA graph, equals the same call run
eagerly, on the capture's inputs and on new ones copied into them (float64). Written when the staged graph
test (tests/test_vlm_graphed.py) found keep decisions differing between replay and the uncaptured prefill; all
11 held on an H100 (2026-12-07), which pointed at the inputs instead: the graph lacked the batch's labels. Kept
as the guard that these ops stay capture-safe. CUDA only."""
import pytest
import torch
import torch.nn.functional as F

from vlm.hard_drop import left_pack, top_k_keep
from vlm.layer_pruner import LayerSpecificPruner
from vlm.merger import LearnableTokenMerger

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).cuda()


def replay_differences(make_inputs, fn):
    """Largest |replay - eager| of fn's outputs for inputs made with seeds 0 (the capture's), 1 and 2."""
    static = [t.clone() for t in make_inputs(0)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(*static)
    captured = captured if isinstance(captured, tuple) else (captured,)
    differences = []
    for seed in (0, 1, 2):
        inputs = make_inputs(seed)
        for target, value in zip(static, inputs):
            target.copy_(value)
        graph.replay()
        eager = fn(*inputs)
        eager = eager if isinstance(eager, tuple) else (eager,)
        differences.append(max(float((a.double() - b.double()).abs().max()) for a, b in zip(captured, eager)))
    return differences


def valid(n):
    return torch.ones(2, n, dtype=torch.bool, device="cuda")


def merger_case():
    merger = LearnableTokenMerger(32, 576, d_internal=32, question_aware=True, assignment="others",
                                  similarity="cosine").eval().to("cuda", torch.float64)
    return (lambda s: [random(s, 2, 576, 32), random(s + 9, 2, 20, 32)],
            lambda v, q: (merger(v, 0.1, q, valid(20)).centres, merger(v, 0.1, q, valid(20)).merged))


def pruner_case(decide: bool):
    pruner = LayerSpecificPruner(32, 32, (10, 20, 31), d_internal=32, keep_ratio=0.3).eval().to("cuda", torch.float64)
    index = torch.arange(5, 57, device="cuda")[None].expand(2, -1).contiguous()
    if decide:
        return (lambda s: [random(s, 2, 60, 32)],
                lambda h: pruner.decide(31, h, index, valid(52), h, valid(60), training=False, temperature=0.1))
    return lambda s: [random(s, 2, 60, 32)], lambda h: pruner.keep_logits(31, h, index, valid(52), h, valid(60))


def masked_scatter_case():
    span = torch.zeros(2, 600, 32, dtype=torch.bool, device="cuda")
    span[:, 10:298] = True
    return (lambda s: [random(s, 2, 600, 32), random(s + 5, 2, 288, 32)],
            lambda embeds, features: embeds.masked_scatter(span, features))


# name -> a function making (make_inputs(seed) -> input tensors, fn(*inputs) -> output tensors) on the GPU
CASES = {
    "topk indices": lambda: (lambda s: [random(s, 2, 576)],
                             lambda x: x.topk(289, dim=-1).indices.sort(dim=-1).values),
    "argsort stable 52": lambda: (lambda s: [random(s, 2, 52)],
                                  lambda x: x.argsort(dim=1, descending=True, stable=True)),
    "argsort stable 288": lambda: (lambda s: [random(s, 2, 288)],
                                   lambda x: x.argsort(dim=1, descending=True, stable=True)),
    "top_k_keep 52 -> 16": lambda: (lambda s: [random(s, 2, 52)],
                                    lambda x: top_k_keep(x, valid(52), torch.full((2, 1), 16, device="cuda"))),
    "left_pack": lambda: (lambda s: [random(s, 2, 300) > 0], lambda keep: left_pack(keep, 300)[0]),
    "masked_scatter": masked_scatter_case,
    "merger": merger_case,
    "pruner head logits": lambda: pruner_case(decide=False),
    "pruner decide": lambda: pruner_case(decide=True),
    "sdpa bool mask": lambda: (lambda s: [random(s, 2, 4, 52, 8), random(s + 1, 2, 4, 60, 8)],
                               lambda q, k: F.scaled_dot_product_attention(q, k, k,
                                                                           attn_mask=valid(60)[:, None, None])),
    "sdpa causal": lambda: (lambda s: [random(s, 2, 4, 300, 8)],
                            lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True)),
}


@pytest.mark.gpu
@cuda
@torch.no_grad()
@pytest.mark.parametrize("name", list(CASES))
def test_captured_primitive_equals_eager(name):
    make_inputs, fn = CASES[name]()
    differences = replay_differences(make_inputs, fn)
    assert max(differences) <= 1e-12, f"{name}: replay vs eager for inputs 0 (captured), 1, 2: {differences}"
