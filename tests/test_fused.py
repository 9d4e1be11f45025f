"""Horizontal fusion (training/fused): N cells in one model compute what N separate models compute."""
import pytest
import torch

from data import ImageSet
from data.loader import TensorLoader
from data.synthetic import read_synthetic
from models import create_model, dense_modules
from pruners.base import RoundPlan
from pruners.masks import prunable_weights
from training.fused import FusedTrainStep, fuse_masks, fuse_models
from training.step import TrainStep

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]
CPU = torch.device("cpu")
ROUTE = {"res20s": "grouped", "test_vit": "streams"}


def make_models(arch, seeds):
    """One model per seed (different inits); BatchNorm running stats and affines drawn per seed too,
    so eval-mode forwards and the stat updates differ between cells."""
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = create_model(arch, 10)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.normal_(0, 0.1)
        models.append(model)
    return models


@pytest.mark.parametrize("arch,train,route", [("res20s", True, "auto"), ("res20s", False, "auto"),
                                              ("test_vit", True, "auto"), ("res20s", True, "streams"),
                                              ("res20s", False, "streams"), ("test_vit", True, "streams"),
                                              ("test_vit", True, "grouped"), ("vit_tiny", False, "grouped")])
def test_fused_forward_matches_each_model(arch, train, route):
    models = make_models(arch, [1, 2, 3])
    fused = fuse_models(models, route)
    assert fused.route == (ROUTE[arch] if route == "auto" else route) and fused.cells == 3
    fused.train(train)
    for model in models:
        model.train(train)
    images = torch.randn(3, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images[1] = images[0]  # cells 0 and 1 see the same images: their logits differ by their weights only
    with torch.no_grad():
        logits = fused(images)
        assert logits.shape == (3, 8, 10)
        for i, model in enumerate(models):
            assert (logits[i] - model(images[i])).abs().max() <= 1e-5
    assert (logits[0] - logits[1]).abs().max() > 1e-2
    # BatchNorm running statistics after the forward (train: updated from each cell's batch; eval: unchanged)
    for state, model in zip(fused.unfuse(), models):
        for name, value in model.state_dict().items():
            assert (state[name].double() - value.double()).abs().max() <= 1e-6, name
    if arch == "res20s":
        assert int(fused.unfuse()[0]["bn1.num_batches_tracked"]) == (1 if train else 0)


@pytest.mark.parametrize("arch,route", [("res20s", "auto"), ("test_vit", "auto"), ("test_vit", "grouped")])
def test_unfuse_round_trip_is_exact(arch, route):
    models = make_models(arch, [4, 5])
    fused = fuse_models(models, route)
    states = fused.unfuse()
    for state, model in zip(states, models):
        expected = model.state_dict()
        assert list(state) == list(expected)
        assert all(torch.equal(state[name], expected[name]) for name in expected)
    again = fuse_models(make_models(arch, [6, 7]), route)
    again.load_cells(states[::-1])
    for state, expected in zip(again.unfuse(), states[::-1]):
        assert all(torch.equal(state[name], expected[name]) for name in expected)
    fresh = create_model(arch, 10)
    fresh.load_state_dict(states[1])  # strict: exactly the cell's keys and shapes


def test_fused_params_and_masks_address_each_cell():
    models = make_models("res20s", [1, 2])
    fused = fuse_models(models)
    params = fused.fused_params
    assert list(params) == [name for name, _ in models[0].named_parameters()]
    conv, index = params["layers.3.conv1.weight"]  # 16 -> 32 channels, stride 2
    assert conv.shape == (64, 16, 3, 3) and index == [slice(0, 32), slice(32, 64)]
    fc, index = params["fc.weight"]
    assert fc.shape == (2, 10, 64) and index == [0, 1]
    assert torch.equal(fc[1], models[1].fc.weight)
    generator = torch.Generator().manual_seed(3)
    weights = prunable_weights(models[0])
    cell_masks = [{n: (torch.rand(w.shape, generator=generator) < density).float() for n, w in weights.items()}
                  for density in (0.5, 0.2)]
    masks = fuse_masks(fused, cell_masks)
    for name, (tensor, index) in params.items():
        if name in masks:
            assert masks[name].shape == tensor.shape
            for i in range(2):
                assert torch.equal(masks[name][index[i]], cell_masks[i][name])
    assert float(masks["fc.weight"][0].mean()) == pytest.approx(float(cell_masks[0]["fc.weight"].mean()))


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="model 1 differs from model 0"):
        fuse_models([create_model("res20s", 10), create_model("res20s", 100)])
    with pytest.raises(ValueError, match="cannot update BatchNorm running statistics"):
        fuse_models(make_models("res20s", [1]), route="vmap")
    with pytest.raises(ValueError, match=r"^grouped fusion cannot widen stem.1 \(LayerNorm2d\).*use route='vmap'$"):
        fuse_models(make_models("test_convnext", [1]), route="grouped")
    with pytest.raises(ValueError, match=r"^grouped ViT fusion takes timm's plain ViT; this one differs in: no class "
                                         r"token; register tokens; use route='streams'$"):
        fuse_models(make_models("test_vit2", [1]), route="grouped")
    with pytest.raises(ValueError, match="unknown fusion route 'hfta'"):
        fuse_models(make_models("res20s", [1]), route="hfta")
    fused = fuse_models(make_models("res20s", [1, 2]))
    with pytest.raises(ValueError, match="weight_decay: 1 values for 2 cells"):
        FusedTrainStep(fused, [], CPU, "none", 0.9, [1e-4], regularized=False, use_graph=False)
    with pytest.raises(ValueError, match="masked names not among .*: nope.weight"):
        FusedTrainStep(fused, ["nope.weight"], CPU, "none", 0.9, [0, 0], regularized=False, use_graph=False)


def held_tensors(step):
    """Every tensor a step object keeps (its attributes, and lists / dicts of them)."""
    for value in vars(step).values():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        yield from (v for v in values if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("arch,route", [("res20s", "auto"), ("test_vit", "auto"), ("test_vit", "grouped")])
def test_steps_keep_no_autograd_history(arch, route):
    """A kept tensor with a grad_fn (e.g. a view of a parameter made with grad enabled) holds the
    parameter's AccumulateGrad node, bound to the stream it was made on: CUDA graph capture of the
    backward then fails on the GPU. Neither the fused step nor the plain one may keep one."""
    models = make_models(arch, [1, 2])
    names = list(prunable_weights(models[0], exclude=dense_modules(models[0])))
    fused = FusedTrainStep(fuse_models(models, route), names, CPU, "none", 0.9, [1e-4, 5e-4], regularized=True,
                           use_graph=False)
    masks = {n: torch.ones_like(w) for n, w in prunable_weights(models[0], exclude=dense_modules(models[0])).items()}
    plain = TrainStep(models[0], masks, CPU, "none", 0.9, 1e-4, regularized=True, use_graph=False)
    for step in (fused, plain):
        kept = list(held_tensors(step))
        assert len(kept) > 10
        assert [t.shape for t in kept if t.grad_fn is not None] == []


@pytest.mark.parametrize("route,layout", [("grouped", torch.contiguous_format), ("grouped", torch.channels_last),
                                          ("streams", torch.channels_last)])
def test_fused_update_rule_per_cell_in_either_layout(route, layout):
    """One step of a grouped model, contiguous or channels_last (as the GPU benchmark runs it), against the
    update rule written out per cell from the same model's own gradients: d = g*mask + lambda_i*w*penalty +
    wd_i*w, momentum = d, w' = (w - lr_i*d)*mask. The per-cell row views follow each parameter's memory
    order; misaligned rows would put one element's lr, lambda or decay on another."""
    import copy
    generator = torch.Generator().manual_seed(3)
    models = make_models("res20s", [1, 2])
    names = list(prunable_weights(models[0], exclude=dense_modules(models[0])))
    plans = []
    for model in models:
        masks = {n: (torch.rand(w.shape, generator=generator) > 0.5).float()
                 for n, w in prunable_weights(model, exclude=dense_modules(model)).items()}
        penalty = {n: m * (torch.rand(m.shape, generator=generator) > 0.5).float() for n, m in masks.items()}
        plans.append(RoundPlan(train_masks=masks, final_masks=masks, penalty_masks=penalty))
    images = torch.randn(2, 8, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (2, 8), generator=generator)
    lr, reg, wd = [0.05, 0.02], [0.5, 0.1], [1e-4, 5e-4]
    fused = fuse_models(models, route)
    fused = fused.to(memory_format=layout) if route == "grouped" else fused.to_channels_last()
    reference = copy.deepcopy(fused)  # same layout, same kernels: its gradients are the step's
    loss = torch.nn.functional.cross_entropy(reference(images).reshape(16, -1), labels.reshape(-1), reduction="none")
    loss.view(2, 8).mean(1).sum().backward()
    before = fused.unfuse()
    step = FusedTrainStep(fused, names, CPU, "none", 0.9, wd, regularized=True, use_graph=False)
    step.start_round(plans)
    step(images, labels, lr=lr, reg_lambda=reg)
    first_conv = step.params[0] if route == "grouped" else step.params[0][1]  # streams: cell 1's view
    assert first_conv.dim() == 4 and first_conv.is_contiguous(memory_format=layout)
    params = reference.fused_params
    after = fused.unfuse()
    for i, plan in enumerate(plans):
        momentum = dict(zip(step.cell_names, step.cell_state_dict(i)["momentum_buffers"]))
        for name in step.cell_names:
            tensor, index = params[name]
            w, g = before[i][name], tensor.grad[index[i]]
            mask = plan.train_masks.get(name)
            d = g + wd[i] * w if mask is None else g * mask + reg[i] * w * plan.penalty_masks[name] + wd[i] * w
            expected = w - lr[i] * d if mask is None else (w - lr[i] * d) * mask
            assert torch.allclose(momentum[name], d, rtol=1e-5, atol=1e-7), (i, name)
            assert torch.allclose(after[i][name], expected, rtol=1e-5, atol=1e-7), (i, name)


def test_float32_attention_mode_runs_sdpa_in_float32_under_autocast():
    """The vmap route's CUDA attention under bf16 autocast: float32 inside, the query's dtype out, gradients
    flow; other functions are untouched (a matmul still runs in bf16)."""
    from training.fused.stacked import Float32Attention
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 5, 8, generator=generator).to(torch.bfloat16).requires_grad_()
    mask = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    with torch.autocast("cpu", dtype=torch.bfloat16), Float32Attention():
        out = torch.nn.functional.scaled_dot_product_attention(query, query, query, attn_mask=mask)
        product = torch.randn(2, 3, generator=generator) @ torch.randn(3, 2, generator=generator)
    exact = torch.nn.functional.scaled_dot_product_attention(query.float(), query.float(), query.float(),
                                                             attn_mask=mask)
    assert out.dtype == torch.bfloat16 and product.dtype == torch.bfloat16
    assert (out.float() - exact).abs().max() <= 2 ** -7 * exact.abs().max()  # bf16 rounding of the output only
    out.float().sum().backward()
    assert query.grad.dtype == torch.bfloat16 and torch.isfinite(query.grad).all()


# cell i: seed, init seed, learning rate (times a per-step ramp), RSST lambda, weight decay, mask density
CELLS = [dict(seed=11, lr=0.05, reg=0.3, wd=5e-4, density=0.5), dict(seed=22, lr=0.02, reg=1.0, wd=1e-3, density=0.3)]
BATCH, STEPS = 32, 8


def cell_setup(arch, cell, model):
    """A cell's masked weights, masks (its own generator and density) and penalty masks."""
    weights = prunable_weights(model, exclude=dense_modules(model))
    generator = torch.Generator().manual_seed(cell["seed"])
    masks = {n: (torch.rand(w.shape, generator=generator) < cell["density"]).float() for n, w in weights.items()}
    penalty = {n: m * (torch.rand(m.shape, generator=generator) < 0.5).float() for n, m in masks.items()}
    return weights, RoundPlan(train_masks=masks, final_masks=masks, penalty_masks=penalty)


def cell_loader(train_set, cell, batch):
    loader = TensorLoader(train_set, batch, (0.5,) * 3, (0.25,) * 3, CPU, train=True, drop_last=True)
    loader.set_epoch_seed(cell["seed"])  # each cell's own order and crops/flips
    return loader


# float64 shows the fused step IS the separate steps (weights and momentum agree to 1e-9 after 8 steps).
# In fp32, res20s's conv1 gradient on these images carries ~1e-4 relative rounding noise (a BatchNorm'd
# sum over 32k positions; it differs as much between two memory layouts of one separate run) and SGD at
# these learning rates grows weight differences 5-10x per step, so its fp32 check is 2 steps and its
# momentum (gradient-sized) tolerance 1e-4.
@pytest.mark.parametrize("arch,dtype,batch,steps,tol,momentum_tol,route", [
    ("res20s", torch.float64, 16, STEPS, 1e-9, 1e-9, "auto"),
    ("res20s", torch.float32, BATCH, 2, 1e-5, 1e-4, "auto"),
    ("test_vit", torch.float32, BATCH, STEPS, 1e-5, 1e-5, "auto"),
    ("test_vit", torch.float32, BATCH, STEPS, 1e-5, 1e-5, "grouped"),
    ("res20s", torch.float64, 16, STEPS, 1e-9, 1e-9, "streams")])
def test_fused_pair_trains_like_two_separate_runs(arch, dtype, batch, steps, tol, momentum_tol, route):
    train, _ = read_synthetic("")
    train_set = ImageSet(train.images[:batch * steps], train.labels[:batch * steps])
    models = [model.to(dtype) for model in make_models(arch, [cell["seed"] for cell in CELLS])]
    fused = fuse_models(models, route)  # copies: the models below train separately
    plans = [cell_setup(arch, cell, model)[1] for cell, model in zip(CELLS, models)]

    separate = []
    for cell, model, plan in zip(CELLS, models, plans):
        weights, _ = cell_setup(arch, cell, model)
        step = TrainStep(model, weights, CPU, "none", 0.9, cell["wd"], regularized=True, use_graph=False)
        step.start_round(plan)
        losses, before = [], 0.0
        for k, (images, labels) in enumerate(cell_loader(train_set, cell, batch)):
            # contiguous, as the fused batch is after stacking (the loader's crops come channels-last)
            step(images.contiguous().to(dtype), labels, lr=cell["lr"] * (k + 1) / STEPS, reg_lambda=cell["reg"])
            losses.append((step.running_loss_sum() - before) / batch)
            before = step.running_loss_sum()
        separate.append((losses, step.correct.item(), step.state_dict()["momentum_buffers"]))

    masked_names = list(plans[0].train_masks)
    fused_step = FusedTrainStep(fused, masked_names, CPU, "none", 0.9, [c["wd"] for c in CELLS],
                                regularized=True, use_graph=False)
    fused_step.start_round(plans)
    fused_losses, before = [], torch.zeros(2)
    loaders = [cell_loader(train_set, cell, batch) for cell in CELLS]
    for k, batches in enumerate(zip(*loaders)):
        images = torch.stack([b[0] for b in batches]).to(dtype)
        labels = torch.stack([b[1] for b in batches])
        fused_step(images, labels, lr=[c["lr"] * (k + 1) / STEPS for c in CELLS], reg_lambda=[c["reg"] for c in CELLS])
        fused_losses.append((fused_step.loss_sum - before) / batch)
        before = fused_step.loss_sum.clone()
    assert len(fused_losses) == steps
    fused_states = fused.unfuse()
    for i, (losses, correct, momentum) in enumerate(separate):
        for k in range(steps):  # the loss counters are fp32 in both steps: 1e-5 whatever the dtype
            assert float(fused_losses[k][i]) == pytest.approx(losses[k], rel=1e-5), (i, k)
        assert int(fused_step.correct[i]) == correct
        for name, value in models[i].state_dict().items():
            assert (fused_states[i][name].double() - value.double()).abs().max() <= tol, (i, name)
        for name, mask in plans[i].train_masks.items():
            assert torch.all(fused_states[i][name][mask == 0] == 0), (i, name)
        for fused_buf, buf in zip(fused_step.cell_state_dict(i)["momentum_buffers"], momentum):
            assert (fused_buf - buf).abs().max() <= momentum_tol
    assert separate[0][0] != pytest.approx(separate[1][0], rel=1e-3)  # the cells did differ
    loss_sums, corrects, bad = fused_step.read_epoch()
    assert bad == [None, None] and corrects == [s[1] for s in separate]


@pytest.mark.parametrize("route", ["auto", "streams"])
def test_skip_batch_skips_only_the_bad_cell(route):
    """--nan_policy skip_batch per cell: cell 1 gets a NaN batch at step 2; it keeps its weights and momentum
    for that step and counts neither its loss nor its accuracy (TrainStep's skip, on the device), while cell 0
    steps. float64: both cells equal their separate skip_nonfinite TrainSteps to 1e-8 after 4 steps."""
    generator = torch.Generator().manual_seed(5)
    models = [model.double() for model in make_models("res20s", [1, 2])]
    fused = fuse_models(models, route)
    plans = [cell_setup("res20s", cell, model)[1] for cell, model in zip(CELLS, models)]
    batches = [(torch.randn(2, 8, 3, 32, 32, generator=generator, dtype=torch.float64),
                torch.randint(0, 10, (2, 8), generator=generator)) for _ in range(4)]
    batches[2][0][1, 3, 0, 5, 5] = float("nan")
    separate = []
    for i, (cell, model, plan) in enumerate(zip(CELLS, models, plans)):
        weights, _ = cell_setup("res20s", cell, model)
        step = TrainStep(model, weights, CPU, "none", 0.9, cell["wd"], regularized=True, use_graph=False,
                         skip_nonfinite=True)
        step.start_round(plan)
        taken = [step(images[i], labels[i], lr=cell["lr"], reg_lambda=cell["reg"]) for images, labels in batches]
        separate.append((taken, step.read_epoch(), step.state_dict()["momentum_buffers"]))
    assert [s[0] for s in separate] == [[True] * 4, [True, True, False, True]]
    step = FusedTrainStep(fused, list(plans[0].train_masks), CPU, "none", 0.9, [c["wd"] for c in CELLS],
                          regularized=True, use_graph=False, skip_nonfinite=True)
    step.start_round(plans)
    for images, labels in batches:
        step(images, labels, lr=[c["lr"] for c in CELLS], reg_lambda=[c["reg"] for c in CELLS])
    assert step.skipped.tolist() == [0, 1]
    loss_sum, correct, bad = step.read_epoch()
    assert bad == [None, None] and step.skipped.tolist() == [0, 0]  # read_epoch resets the counter
    states = fused.unfuse()
    for i, (taken, (cell_loss, cell_correct, _), momentum) in enumerate(separate):
        assert loss_sum[i] == pytest.approx(cell_loss, rel=1e-9) and correct[i] == cell_correct
        for name, value in models[i].state_dict().items():  # NaN BatchNorm statistics in cell 1, as separately
            assert torch.allclose(states[i][name].double(), value.double(), rtol=0, atol=1e-8, equal_nan=True), name
        for fused_buf, buf in zip(step.cell_state_dict(i)["momentum_buffers"], momentum):
            assert (fused_buf - buf).abs().max() <= 1e-7 * max(buf.abs().max(), 1.0), (i, buf.abs().max())
    assert all(torch.isfinite(t).all() for name, t in states[1].items() if "running" not in name)
