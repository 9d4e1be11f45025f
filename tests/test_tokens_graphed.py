"""Anchor scoring replayed from CUDA graphs (tokens/graphed.py) selects exactly what eager scoring selects."""

import warnings

import pytest
import torch

from models import create_model
from tokens import apply_pruning_to_model
from tokens.graphed import ScoringGraphs, capture
from tokens.patching import PRUNE

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def pruning_hook(handle):
    block = handle.target.blocks[handle.plan.start_block]
    found = [fn for fn in block._forward_pre_hooks.values() if getattr(fn, "role", None) == PRUNE]
    assert len(found) == 1
    return found[0]


def cuda_vit_and_images(batch: int = 4):
    torch.manual_seed(0)
    return create_model("vit_tiny", 10).cuda().eval(), torch.randn(batch, 3, 32, 32, device="cuda")


def outputs_and_kept(model, images, graphs: bool, grad: bool = False):
    with apply_pruning_to_model(model, 4, 8, 0.5, scoring_graphs=graphs) as handle:
        hook = pruning_hook(handle)
        out = model(images)
        kept = hook.state.kept.clone()
        cache = len(hook.graphs.graphs) if hook.graphs is not None else 0
    return out, kept, cache


def test_cpu_scoring_never_captures():
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10).eval()
    with torch.no_grad():
        _, kept, cache = outputs_and_kept(model, torch.randn(2, 3, 32, 32), graphs=True)
    assert cache == 0 and kept.shape == (2, 13)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast"])
def test_graphed_selection_equals_eager(dtype, mode):
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10).cuda().to(dtype).eval()
    contexts = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
                "autocast": lambda: torch.autocast("cuda", dtype=torch.bfloat16)}  # as clip_benchmark's --amp
    with torch.no_grad(), contexts[mode]():
        for batch in (3, 5, 3):  # the second batch-3 call replays the cached graph
            images = torch.randn(batch, 3, 32, 32, device="cuda", dtype=dtype)
            eager_out, eager_kept, _ = outputs_and_kept(model, images, graphs=False)
            graph_out, graph_kept, cache = outputs_and_kept(model, images, graphs=True)
            assert cache == 1
            assert torch.equal(graph_kept, eager_kept) and torch.equal(graph_out, eager_out)


@needs_cuda
@pytest.mark.gpu
def test_replay_sees_weights_updated_in_place_and_moved():
    model, images = cuda_vit_and_images()
    with torch.no_grad(), apply_pruning_to_model(model, 4, 8, 0.5) as handle:
        hook = pruning_hook(handle)
        model(images)
        before = hook.state.kept.clone()
        block = handle.target.blocks[1]
        block.attn.qkv.weight.mul_(-3.0)  # in place: the captured graph reads the new values
        block.norm1.weight.add_(torch.randn_like(block.norm1.weight))
        model(images)
        graphed_after = hook.state.kept.clone()
        assert len(hook.graphs.graphs) == 1
        block.attn.qkv.weight = torch.nn.Parameter(block.attn.qkv.weight.clone())  # moved: captured anew
        model(images)
        assert len(hook.graphs.graphs) == 2 and torch.equal(hook.state.kept, graphed_after)
    with torch.no_grad(), apply_pruning_to_model(model, 4, 8, 0.5, scoring_graphs=False) as handle:
        model(images)
        eager_after = pruning_hook(handle).state.kept.clone()
    assert torch.equal(graphed_after, eager_after) and not torch.equal(before, eager_after)


@needs_cuda
@pytest.mark.gpu
def test_training_scores_eagerly_and_outer_capture_matches_eager():
    torch.manual_seed(0)
    base = create_model("vit_tiny", 10).cuda()
    images, labels = torch.randn(6, 3, 32, 32, device="cuda"), torch.randint(0, 10, (6,), device="cuda")
    with apply_pruning_to_model(base, 4, 8, 0.5) as handle:
        torch.nn.functional.cross_entropy(base(images), labels).backward()  # autograd records: no capture
        assert len(pruning_hook(handle).graphs.graphs) == 0 and base.blocks[0].attn.qkv.weight.grad is not None
        with torch.no_grad():
            base.eval()(images)
        assert len(pruning_hook(handle).graphs.graphs) == 1

    model = base.eval()
    with torch.inference_mode(), apply_pruning_to_model(model, 4, 8, 0.5) as handle:
        expected = model(images)
        static = images.clone()
        graph, out = capture(lambda: model(static), images.device)  # scoring inside it runs eagerly into it
        graph.replay()
        assert torch.equal(out, expected)
        assert len(pruning_hook(handle).graphs.graphs) == 1  # only the eager forward's entry


@needs_cuda
@pytest.mark.gpu
def test_compiled_pruned_model_traces_the_eager_scoring():
    model, images = cuda_vit_and_images()
    with torch.no_grad(), apply_pruning_to_model(model, 4, 8, 0.5, scoring_graphs=False):
        expected = model(images)
    with torch.no_grad(), apply_pruning_to_model(model, 4, 8, 0.5) as handle:
        compiled = torch.compile(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = compiled(images)
        assert not [w for w in caught if "scoring runs eagerly" in str(w.message)]  # no failed capture
        assert not pruning_hook(handle).graphs.disabled
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.gpu
def test_capture_failure_warns_and_scores_eagerly_from_then_on():
    from tokens.anchor import Selection
    calls = []

    def score(tokens):  # .item() synchronises, which a CUDA graph capture does not permit
        calls.append(tokens.sum().item())
        return Selection(tokens[:, :2].long(), tokens[:, :1].long(), tokens.float())
    graphs = ScoringGraphs()
    tokens = torch.ones(2, 3, device="cuda")
    with pytest.warns(UserWarning, match="scoring runs eagerly"):
        first = graphs(tokens, score, [])
    second = graphs(tokens, score, [])
    assert graphs.disabled and not graphs.graphs and torch.equal(first.keep, second.keep)
    assert torch.equal(second.cls_attention, tokens) and (torch.ones(3, device="cuda") * 2).sum().item() == 6


@needs_cuda
@pytest.mark.gpu
def test_partial_batch_scores_eagerly_and_copies_capture_their_own_graphs():
    import copy
    import io
    from tokens.patching import pruning_handle
    torch.manual_seed(0)  # images drawn on the CPU: a failed capture in an earlier test can upset the CUDA generator
    model, images = create_model("vit_tiny", 10).cuda().eval(), torch.randn(8, 3, 32, 32).cuda()
    with torch.no_grad():
        with apply_pruning_to_model(model, 4, 8, 0.5, scoring_graphs=False) as handle:
            model(images[:5])
            eager_partial = pruning_hook(handle).state.kept.clone()
        with apply_pruning_to_model(model, 4, 8, 0.5) as handle:
            hook = pruning_hook(handle)
            model(images)
            kept = hook.state.kept.clone()
            model(images[:5])  # an evaluation's last, partial batch: no second capture
            assert handle.captures() == 1 and len(hook.graphs.graphs) == 1
            assert torch.equal(hook.state.kept, eager_partial)
            torch.save(model, io.BytesIO())  # captured graphs are not part of what is saved
            twin = copy.deepcopy(model)
            twin_handle = pruning_handle(twin)
            twin_hook = pruning_hook(twin_handle)
            assert twin_handle.captures() == 0 and not twin_hook.graphs.graphs
            twin.blocks[1].attn.qkv.weight.mul_(-3.0)  # the copy's own weights, read by its own graph
            twin(images)
            assert twin_handle.captures() == 1 and not torch.equal(twin_hook.state.kept, kept)
            model(images)
            assert torch.equal(hook.state.kept, kept)
            twin_handle.restore()
