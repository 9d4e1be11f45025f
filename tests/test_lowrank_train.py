"""Low-rank factorisers and their trainer (issue 12, items 2 and 5): shapes, losses, peft's RankAllocator
on schedule, truncation, resume, early stopping, bad input, outputs. Tiny caches [16, 32] on the CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lowrank.cache import write_cache
from lowrank.losses import factorisation_loss, orthogonality
from lowrank.models import ARCHS, create_model, least_squares_code, load_trained, save_trained
from lowrank.rank_allocation import AllocatorSettings, RankAllocation
from lowrank.train_cli import main
from utils.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, D = 16, 32


def _features(count, seed, true_rank=6):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(N, true_rank, generator=generator) @ torch.randn(true_rank, D, generator=generator)
            + 0.05 * torch.randn(N, D, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Two caches of the same 40 samples written by two encoder names, and an empty one."""
    root = tmp_path_factory.mktemp("lowrank_caches")
    paths = {}
    specs = (("main", "synthetic-a", 40), ("other", "synthetic-b", 40), ("empty", "synthetic-a", 0))
    for name, encoder, count in specs:
        paths[name] = str(root / name)
        write_cache(paths[name], encoder, {"test": True}, _features(count, seed=0), shard_size=16, dtype=torch.float32)
    return paths


def _train(capsys, *args):
    """main(args) in this process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _history(results, arch):
    with open(os.path.join(results, arch, "history.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("arch", ["ResMLP", "MLP", "AdaLoRA"])
def test_shapes_and_loss_terms(arch, one_thread):
    torch.manual_seed(0)
    model = create_model(arch, D, N, rank=5)
    x = torch.randn(3, N, D)
    a, b = model(x)
    assert a.shape == (3, N, 5) and b.shape == (3, 5, D) and model.rank == 5
    terms = factorisation_loss(a, b, x, lambda_b=0.1, lambda_ortho=0.01)
    mse = ((a @ b - x) ** 2).mean()
    gram = b @ b.transpose(1, 2)
    ortho = ((gram - torch.eye(5)) ** 2).sum() / (3 * 25)
    assert torch.allclose(terms.mse, mse) and torch.allclose(terms.orthogonality, ortho)
    assert torch.allclose(terms.b_penalty, (b ** 2).sum() / (3 * 5 * D))
    assert torch.allclose(terms.total, mse + 0.1 * terms.b_penalty + 0.01 * ortho)
    assert sorted(ARCHS.names()) == ["AdaLoRA", "MLP", "ResMLP"]
    with pytest.raises(ValueError, match=r"expected \[batch, 16, 32\]"):
        model(torch.randn(3, N, D + 1))


def test_orthogonality_zero_on_orthonormal_rows():
    q, _ = torch.linalg.qr(torch.randn(2, D, 4))          # [2, D, 4] orthonormal columns
    basis = q.transpose(1, 2)                              # rows orthonormal
    assert float(orthogonality(basis)) < 1e-12
    # 2 x orthonormal rows: B B^T = 4 I, so ||3 I||^2 / r^2 = 9 r / r^2 = 9 / 4
    assert float(orthogonality(2 * basis)) == pytest.approx(9 / 4, rel=1e-5)


def _allocated(init_rank=8, keep_ratio=0.5, total=20, tinit=2, tfinal=5, interval=1):
    torch.manual_seed(0)
    model = create_model("AdaLoRA", D, N, rank=init_rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    allocation = RankAllocation(model, AllocatorSettings(tinit, tfinal, interval, keep_ratio), total)
    x = torch.stack(_features(4, seed=1))
    ranks = []
    for step in range(1, total + 1):
        loss = factorisation_loss(*model(x), x, 1e-4, 1e-3).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ranks.append(allocation.step(step))
    return model, x, ranks


def test_rank_allocator_lowers_rank_on_schedule(one_thread):
    """peft's cubic budget: r(s) = int((8 - 4) (1 - (s - 2) / (20 - 5 - 2))^3 + 4) between the warm-ups."""
    _, _, ranks = _allocated()
    expected = [8 if s <= 2 else 4 if s >= 15 else int(4 * (1 - (s - 2) / 13) ** 3 + 4) for s in range(1, 21)]
    assert ranks == expected
    assert ranks[:8] == [8, 8, 7, 6, 5, 5, 4, 4]


def test_masked_ranks_stay_masked_between_masks(one_thread):
    """Masks every 3 steps (3, 6, 9, 12) and the final one at step 15: the rank only changes there."""
    _, _, ranks = _allocated(interval=3)
    budget = [int(4 * (1 - (s - 2) / 13) ** 3 + 4) for s in (3, 6, 9, 12)]
    assert budget == [7, 5, 4, 4]
    assert ranks == [8, 8] + [7] * 3 + [5] * 3 + [4] * 12


def test_target_rank_must_be_below_initial_rank():
    model = create_model("AdaLoRA", D, N, rank=8)
    with pytest.raises(UsageError, match="target rank 8 must be below the initial rank 8"):
        RankAllocation(model, AllocatorSettings(2, 5, 1, 1.0), 20)
    with pytest.raises(UsageError, match="leave no budgeting phase in 20 training steps"):
        RankAllocation(model, AllocatorSettings(10, 10, 1, 0.5), 20)


def test_least_squares_code_is_accurate_when_the_basis_is_ill_conditioned():
    """r = 64 rows in the 65-dim row space of one vit_tiny-shaped sample, nearly collinear (condition ~1e4):
    the fp32 code must match the float64 ridge solution. The normal equations (B B^T squares the condition
    number) missed it by orders of magnitude and made AdaLoRA diverge on real vit_tiny features."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 65, 192, generator=generator, dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(192, 64, generator=generator, dtype=torch.float64))[0]
    basis = (left * torch.logspace(0, -4, 64, dtype=torch.float64)) @ right.T[None]  # singular values 1..1e-4
    eps = 1e-6 * basis.pow(2).sum() / 64
    expected = torch.linalg.solve(basis @ basis.transpose(1, 2) + eps * torch.eye(64, dtype=torch.float64),
                                  basis @ x.transpose(1, 2)).transpose(1, 2)
    got = least_squares_code(x.float(), basis.float()).double()
    assert ((got @ basis - expected @ basis).norm() / (expected @ basis).norm()).item() < 1e-4


def test_adalora_reconstruction_does_not_depend_on_the_scales():
    """The code is fitted to the scaled rows diag(E) Q that the output multiplies out, so A B is the
    projection of x onto span(Q) for any non-zero E (a code fitted to Q alone is off by 1/E_i)."""
    torch.manual_seed(0)
    model = create_model("AdaLoRA", D, N, 8).eval()
    x = torch.randn(3, N, D)
    with torch.no_grad():
        model.lora_B["default"].zero_()  # the learned correction h W, which E does scale, left out
        before = torch.matmul(*model(x))
        model.lora_E["default"].copy_(torch.linspace(0.5, 2.0, 8).view(8, 1))
        after = torch.matmul(*model(x))
    assert torch.allclose(after, before, atol=1e-3)


def test_truncation_keeps_output(tmp_path, one_thread):
    model, x, ranks = _allocated()
    model.eval()
    small = model.truncated()
    assert ranks[-1] == 4 and small.rank == 4 and model.rank == 8
    assert small.lora_A["default"].shape == (4, 32) and small.lora_B["default"].shape == (32, 4)
    assert small.lora_E["default"].shape == (4, 1)
    with torch.no_grad():
        a_full, b_full = model(x)
        a_small, b_small = small(x)
        assert torch.allclose(a_small @ b_small, a_full @ b_full, atol=1e-5)
    meta = {"arch": "AdaLoRA", "dim": D, "num_tokens": N, "rank": 4, "dropout": 0.0, "encoder": "e",
            "epoch": 1, "best_val_mse": 0.5}
    save_trained(str(tmp_path / "m.pt"), small, meta)
    loaded, loaded_meta = load_trained(str(tmp_path / "m.pt"))
    assert loaded.rank == 4 and loaded_meta["encoder"] == "e"
    with torch.no_grad():
        assert torch.allclose(torch.matmul(*loaded.eval()(x)), a_full @ b_full, atol=1e-5)


def test_issue_example_adalora_with_allocator(caches, tmp_path, capsys, one_thread):
    """The issue's command with every flag; 36 train samples at batch 8 = 5 steps/epoch, 4 epochs = 20 steps."""
    results = str(tmp_path / "results")
    code, out, err = _train(capsys, "--arch", "AdaLoRA", "--features", caches["main"], "--epochs", 4, "--lr", 1e-3,
                            "--rank", 8, "--batch_size", 8, "--lambda_B", 1e-4, "--lambda_ortho", 1e-3,
                            "--weight_decay", 1e-5, "--patience", 10, "--results_dir", results, "--dropout", 0.0,
                            "--use_rank_allocator", "--allocator_init_warmup", 2, "--allocator_final_warmup", 5,
                            "--allocator_mask_interval", 1, "--allocator_keep_ratio", 0.5)
    assert code == 0, err
    directory = os.path.join(results, "AdaLoRA")
    (log_dir,) = os.listdir(os.path.join(directory, "log"))
    with open(os.path.join(directory, "log", log_dir, "effective_rank.jsonl")) as f:
        ranks = [json.loads(line)["effective_rank"] for line in f]
    assert len(ranks) == 20 and ranks[:2] == [8, 8] and ranks[-6:] == [4] * 6 and ranks[2] < 8
    model, meta = load_trained(os.path.join(directory, "best_model.pt"))
    assert model.rank == meta["rank"] == 4 and model.lora_A["default"].shape[0] == 4 and meta["allocated"]
    assert [r["effective_rank"] for r in _history(results, "AdaLoRA")][-1] == 4
    assert "rank 4" in out
    for name in ("config.json", "training.log", "summary.json"):
        assert os.path.getsize(os.path.join(directory, "log", log_dir, name)) > 0


def test_resume_appends_epochs_and_writes_plot(caches, tmp_path, capsys, one_thread):
    results = str(tmp_path / "results")
    base = ["--arch", "ResMLP", "--features", caches["main"], "--rank", 4, "--lr", 1e-3, "--results_dir", results]
    assert _train(capsys, *base, "--epochs", 2)[0] == 0
    first = load_trained(os.path.join(results, "ResMLP", "best_model.pt"))[1]
    code, _, err = _train(capsys, *base, "--epochs", 3, "--resume")
    assert code == 0, err
    history = _history(results, "ResMLP")
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    meta = load_trained(os.path.join(results, "ResMLP", "best_model.pt"))[1]
    assert meta["best_val_mse"] <= first["best_val_mse"] and meta["epoch"] >= first["epoch"]
    assert len(os.listdir(os.path.join(results, "ResMLP", "log"))) == 2
    with open(os.path.join(results, "ResMLP", "train_val_loss_comparison.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_early_stopping_triggers(caches, tmp_path, capsys, one_thread):
    """lr 0: the validation MSE never falls after epoch 1, so patience 2 stops after epoch 3 of 10."""
    results = str(tmp_path / "results")
    code, out, err = _train(capsys, "--arch", "MLP", "--features", caches["main"], "--rank", 4, "--lr", 0,
                            "--patience", 2, "--epochs", 10, "--results_dir", results)
    assert code == 0, err
    history = _history(results, "MLP")
    assert len(history) == 3 and len({r["val_mse"] for r in history}) == 1
    assert "(early stop)" in out


def test_fresh_runs_repeat_exactly(caches, tmp_path, capsys, one_thread):
    runs = [str(tmp_path / name) for name in ("a", "b")]
    for results in runs:
        assert _train(capsys, "--arch", "ResMLP", "--features", caches["main"], "--rank", 4, "--epochs", 2,
                      "--lr", 1e-3, "--dropout", 0.1, "--results_dir", results)[0] == 0
    first, second = (_history(results, "ResMLP") for results in runs)
    assert [r["val_mse"] for r in first] == [r["val_mse"] for r in second]
    assert first[0]["val_mse"] != first[1]["val_mse"]


def _refused(capsys, results, *args):
    code, out, err = _train(capsys, *args, "--results_dir", results, "--epochs", 1)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
    return err


def test_bad_inputs_one_line_exit_2_nothing_written(caches, tmp_path, capsys, one_thread):
    results = str(tmp_path / "fresh")
    err = _refused(capsys, results, "--arch", "ResMLP", "--features", caches["main"], "--rank", 17)
    assert "--rank 17: must be between 1 and min(N, D) = min(16, 32) = 16" in err
    err = _refused(capsys, results, "--arch", "ResMLP", "--features", caches["empty"])
    assert "--features" in err and "empty feature cache (0 samples)" in err
    err = _refused(capsys, results, "--arch", "AdaLoRA", "--features", caches["main"], "--rank", 8,
                   "--use_rank_allocator", "--allocator_keep_ratio", 1.0)
    assert "target rank 8 must be below the initial rank 8" in err
    err = _refused(capsys, results, "--arch", "MLP", "--features", caches["main"], "--use_rank_allocator")
    assert "--use_rank_allocator: only --arch AdaLoRA" in err
    assert not os.path.exists(results)
    trained = str(tmp_path / "trained")
    assert _train(capsys, "--arch", "MLP", "--features", caches["main"], "--rank", 4, "--epochs", 1,
                  "--results_dir", trained)[0] == 0
    directory = os.path.join(trained, "MLP")
    before = {name: os.path.getmtime(os.path.join(directory, name)) for name in os.listdir(directory)}
    err = _refused(capsys, trained, "--arch", "MLP", "--features", caches["other"], "--resume")
    assert "trained on features of encoder 'synthetic-a'" in err and "holds encoder 'synthetic-b'" in err
    after = {name: os.path.getmtime(os.path.join(directory, name)) for name in os.listdir(directory)}
    assert before == after and len(os.listdir(os.path.join(directory, "log"))) == 1


def test_seed_script_name_runs_the_same_cli(caches, tmp_path):
    """train_real_data.py (the seed's name) is the same CLI: its refusal is train_lowrank.py's."""
    args = ["--arch", "ResMLP", "--features", caches["main"], "--rank", "99", "--results_dir", str(tmp_path)]
    results = [subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300) for script in ("train_real_data.py", "train_lowrank.py")]
    assert [r.returncode for r in results] == [2, 2]
    message = "error: --rank 99: must be between 1 and min(N, D) = min(16, 32) = 16\n"
    assert results[0].stderr == results[1].stderr == message


def test_speed_benchmark_tiny(tmp_path, capsys, one_thread):
    from benchmarks.lowrank_speed import main as benchmark
    out = str(tmp_path / "speed.json")
    assert benchmark(["--tiny", "--device", "cpu", "--out", out]) == 0
    with open(out) as f:
        report = json.load(f)
    assert report["features"] == [16, 32] and report["rank"] == 8
    rows = {(r["arch"], r["batch_size"]): r for r in report["rows"]}
    assert sorted(rows) == [(a, b) for a in ("AdaLoRA", "AdaLoRA+allocator", "MLP", "ResMLP") for b in (2, 4)]
    assert all(r["samples_per_s"] > 0 and r["parameters"] > 0 for r in rows.values())
    assert "samples/s" in capsys.readouterr().out


def test_non_finite_loss_stops_with_exit_3(tmp_path, capsys, one_thread):
    features = _features(10, seed=2)
    features[3][0, 0] = 1e30  # squares overflow float32
    cache = str(tmp_path / "overflow")
    write_cache(cache, "synthetic-a", {}, features, dtype=torch.float32)
    results = str(tmp_path / "results")
    code, _, err = _train(capsys, "--arch", "MLP", "--features", cache, "--rank", 4, "--epochs", 2,
                          "--batch_size", 16, "--results_dir", results)
    assert code == 3 and err.startswith("error: epoch 1, step 1: the loss is ") and len(err.splitlines()) == 1
    (log_dir,) = os.listdir(os.path.join(results, "MLP", "log"))
    with open(os.path.join(results, "MLP", "log", log_dir, "training.log")) as f:
        assert "stopped: epoch 1, step 1" in f.read()
