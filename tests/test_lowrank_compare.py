"""SVD / PCA / random-projection baselines, the learned/SVD ratio check, compare_svd_nn and visualize_svd_nn
(issue 12). The feature cache, extraction and encoders: test_lowrank_features.py."""
import json
import os

import pytest
import torch

from lowrank import baselines, compare, visualize
from lowrank.cache import split_indices, write_cache
from lowrank.models import create_model, save_trained
from test_lowrank_features import make_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def low_rank_plus_noise(count, tokens, dim, rank, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(count, tokens, rank, generator=g) @ torch.randn(count, rank, dim, generator=g)
            + noise * torch.randn(count, tokens, dim, generator=g))


def save_model(results, arch, cache, rank, seed=0):
    torch.manual_seed(seed)
    tokens, dim = cache.shape
    model = create_model(arch, dim, tokens, rank)
    os.makedirs(results / arch, exist_ok=True)
    save_trained(str(results / arch / "best_model.pt"), model,
                 {"arch": arch, "dim": dim, "num_tokens": tokens, "rank": rank, "dropout": 0.0,
                  "encoder": cache.encoder, "epoch": 1, "best_val_mse": 1.0})
    return model


# --- baselines and the ratio check ---------------------------------------------------------------------------

def test_per_sample_svd_full_rank_is_exact_and_optimal():
    x = torch.randn(3, 9, 6)
    assert torch.allclose(baselines.svd_reconstruct(x, 6), x.double(), atol=1e-10)
    with pytest.raises(ValueError, match="rank 7: must be between 1 and min\\(N, D\\) = 6"):
        baselines.svd_reconstruct(x, 7)
    r3 = baselines.reconstruction_metrics(x, baselines.svd_reconstruct(x, 3))
    s = torch.linalg.svdvals(x.double())
    assert torch.allclose(r3["rel_fro"] ** 2, s[:, 3:].pow(2).sum(1) / s.pow(2).sum(1))  # Eckart–Young


def test_pca_baseline_exact_on_rank_r_data():
    # float64 and seeded: float32 products are rank 4 only up to ~1e-7 rounding, more than the 1e-8 checked
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 10, generator=g, dtype=torch.float64)
    train = torch.randn(30, 8, 4, generator=g, dtype=torch.float64) @ basis  # rows in one 4-dim subspace
    val = torch.randn(5, 8, 4, generator=g, dtype=torch.float64) @ basis
    mean, components, variances = baselines.fit_pca([train[:15], train[15:]])
    assert torch.allclose(baselines.pca_reconstruct(val, mean, components, 4), val.double(), atol=1e-8)
    short = baselines.pca_reconstruct(val, mean, components, 3)
    assert baselines.reconstruction_metrics(val, short)["mse"].min() > 1e-3
    assert float(variances[4:].abs().max()) < 1e-9
    assert baselines.fair_pca_rank(128, 256, 2048) == 1152 and baselines.fair_pca_rank(64, 65, 192) == 192


@pytest.mark.parametrize("structured", [False, True])
def test_learned_over_svd_ratio_at_least_one(structured):
    x = low_rank_plus_noise(12, 16, 24, 4, 0.05) if structured else torch.randn(12, 16, 24)
    models = {arch: create_model(arch, 24, 16, 4) for arch in ("ResMLP", "MLP", "AdaLoRA")}
    models["Oracle"] = Oracle(4)
    result = compare.evaluate(iter([x[:6], x[6:9]]), iter([x[9:]]), 16, 24, [4, 8], models)
    for arch in models:
        assert len(result["ratios"][arch]) == 9 and min(result["ratios"][arch]) >= 1.0
    assert max(result["ratios"]["Oracle"]) < 1 + 1e-4  # the float32 SVD: optimal up to rounding, never below
    rows = {(row["rank"], row["method"]): row for row in result["rows"]}
    assert rows[(4, "svd")]["ratio_vs_svd"]["min"] == 1.0 and rows[(4, "pca")]["kept_rank"] == 10
    assert rows[(4, "svd")]["bytes_per_sample"] == 2 * 4 * (16 + 24) and rows[(4, "ResMLP")]["encode_flops"] > 0


class Oracle(torch.nn.Module):
    """The per-sample truncated SVD's factors computed in float32: the best a learned model can do."""

    def __init__(self, rank):
        super().__init__()
        self.rank, self.anchor = rank, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
        return u[..., :self.rank] * s[..., None, :self.rank], vh[..., :self.rank, :]


class Cheat(torch.nn.Module):
    """Claims rank 2: the SVD's rank-2 factors, except on samples marked by x[0, 0] > 100, which it
    reconstructs exactly through rank-D factors (a bug the ratio check must catch)."""
    rank = 2

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        x = x.double()
        a, b = baselines.truncate(*baselines.svd_factors(x), 2)
        pad = x.shape[-1] - 2
        a = torch.cat([a, a.new_zeros(*a.shape[:2], pad)], -1)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad, b.shape[2])], 1)
        marked = x[:, 0, 0] > 100
        a[marked], b[marked] = x[marked], torch.eye(x.shape[-1], dtype=x.dtype)
        return a, b


def test_ratio_below_one_fails_naming_the_sample(tmp_path, monkeypatch, capsys):
    x = torch.randn(6, 8, 5)
    x[3, 0, 0] = 1000.0
    with pytest.raises(compare.RatioError, match="Cheat \\(rank 2\\): learned/SVD error ratio 0.0+ < 1 on "
                                                 "validation sample 3;"):
        compare.evaluate(iter([x[:2], x[2:]]), iter([x]), 8, 5, [2], {"Cheat": Cheat()})
    samples = torch.randn(20, 8, 5)
    samples[split_indices(20)[1][1], 0, 0] = 1000.0
    cache = make_cache(tmp_path / "c", samples)
    monkeypatch.setattr(compare, "load_models", lambda *a: ({"Cheat": Cheat()}, []))
    assert compare.main(["--features", cache.path, "--results_dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Cheat (rank 2)" in err and "validation sample 1;" in err
    assert not os.path.exists(tmp_path / "r" / "compare_svd_nn.json")


# --- compare_svd_nn.py and visualize_svd_nn.py ------------------------------------------------------------

def test_compare_cli_writes_json_and_table(tmp_path, capsys):
    cache = make_cache(tmp_path / "c", low_rank_plus_noise(30, 17, 12, 3, 0.1))
    save_model(tmp_path / "results", "ResMLP", cache, 4)
    assert compare.main(["--features", cache.path, "--results_dir", str(tmp_path / "results")]) == 0
    result = json.loads((tmp_path / "results" / "compare_svd_nn.json").read_text())
    methods = {(row["rank"], row["method"]) for row in result["rows"]}
    assert methods == {(r, m) for r in (4, 12) for m in ("svd", "pca", "random")} | {(4, "ResMLP")}
    assert result["ranks"] == [4, 12] and result["val_samples"] == 3 and min(result["ratios"]["ResMLP"]) >= 1
    assert any("MLP: skipped, no" in note for note in result["notes"])
    table = (tmp_path / "results" / "compare_svd_nn.md").read_text()
    assert "| 4 | ResMLP | 4 | 232 |" in table and "| 12 | pca | 12 |" in table
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["--ranks", "13"], "--ranks 13: must be between 1 and min(N, D) = 12 (features [17, 12])"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
])
def test_compare_bad_rank_exit_2(tmp_path, capsys, args, needle):
    cache = make_cache(tmp_path / "c", torch.randn(10, 17, 12))
    assert compare.main(["--features", cache.path, "--results_dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {needle}\n"


def test_empty_or_missing_cache_exit_2(tmp_path, capsys):
    write_cache(str(tmp_path / "empty"), "e", {}, [])
    for main in (compare.main, visualize.main):
        assert main(["--features", str(tmp_path / "empty")]) == 2
        assert capsys.readouterr().err == f"error: --features {tmp_path / 'empty'}: empty feature cache (0 samples)\n"
    assert compare.main(["--features", str(tmp_path / "none")]) == 2
    assert "no such feature cache directory" in capsys.readouterr().err
    one = make_cache(tmp_path / "one", torch.randn(1, 4, 3))
    assert compare.main(["--features", one.path]) == 2
    assert capsys.readouterr().err == (f"error: --features {one.path}: 1 cached sample(s): a train/validation "
                                       f"split needs at least 2\n")


def test_plots_written(tmp_path, capsys):
    cache = make_cache(tmp_path / "c", low_rank_plus_noise(12, 65, 20, 3, 0.1))
    save_model(tmp_path / "results", "MLP", cache, 5)
    out = tmp_path / "plots"
    assert visualize.main(["--features", cache.path, "--results_dir", str(tmp_path / "results"), "--image_idx", "4",
                           "--out_dir", str(out)]) == 0
    for name in ("image4_channels.png", "image4_errors.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10000
    assert visualize.grid_prefix(65) == 1 and visualize.grid_prefix(256) == 0 and visualize.grid_prefix(197) == 1
    maps = visualize.token_maps(torch.arange(65 * 20.0).view(65, 20), 1)
    assert maps.shape == (8, 8, 8) and maps[2, 0, 1] == 2 * 20 + 2  # channel 2 of token 2 (grid 0, 1)
    assert visualize.main(["--features", cache.path, "--image_idx", "12"]) == 2
    assert "--image_idx 12: the cache holds samples 0..11" in capsys.readouterr().err
