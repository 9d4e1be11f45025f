"""Slow end-to-end runs: the token speed benchmark in --quick mode and the prune_test.sh smoke script."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.mark.slow
def test_token_speed_quick_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.token_speed", "--quick", "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "torch.float32"
    rows = report["rows"]
    assert {(r["model"].split()[0], r["batch"], r["scope"], r["mode"]) for r in rows} == {
        (lib, b, scope, m) for lib in ("open_clip", "timm") for b in (1, 4) for scope in ("encoder", "blocks")
        for m in ("baseline", "pruned")}
    for row in rows:
        tokens = [197] * 4 if row["mode"] == "baseline" else [197] + [61] * 3
        expected = tokens if row["scope"] == "encoder" else tokens[1:]  # blocks 1.. alone
        assert row["tokens_per_block"] == expected and row["median_ms"] > 0 and row["images_per_s"] > 0
        if row["mode"] == "pruned":
            assert row["ideal_speedup"] > 1.5 and row["achieved_of_ideal"] == pytest.approx(
                row["speedup"] / row["ideal_speedup"], abs=2e-3)
        if row["mode"] == "pruned" and row["scope"] == "blocks":
            assert row["unscored_ms"] > 0 and row["overhead_ms"] == pytest.approx(
                row["median_ms"] - row["unscored_ms"], abs=2e-3)
            # the ideal of blocks 1.. alone has no unpruned block 0 in it: (197-token FLOPs) / (61-token FLOPs)
            assert row["ideal_speedup"] > next(r["ideal_speedup"] for r in rows if r["mode"] == "pruned" and
                                               r["scope"] == "encoder" and r["model"] == row["model"])
    assert "speedup" in proc.stdout and "wrote" in proc.stdout


@pytest.mark.slow
def test_prune_test_script_passes():
    proc = subprocess.run(["bash", os.path.join(ROOT, "prune_test.sh")], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "prune_test: OK" in proc.stdout


@pytest.mark.slow
def test_clip_eval_speed_runs_the_readme_command_and_splits_warm_up(tmp_path):
    """benchmarks.clip_eval_speed: a 16-shard wds set, prune_compare.sh with clip_benchmark's default 4 workers,
    one JSON with steady-state and all-batch images/s (tiny random CLIP on 24 generated images)."""
    from tokens.smoke import write_tiny_model
    model, out = write_tiny_model(str(tmp_path / "model")), tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.clip_eval_speed", "--synthetic", "24", "--model", model,
                           "--batch_size", "4", "--k", "4", "--m", "12", "--out", str(out), "--", "--no_amp"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["command"].endswith("./prune_compare.sh --batch_size 4 --no_amp")
    base, pruned = report["runs"]["baseline"], report["runs"]["pruned"]
    assert base["tokens_per_block"] == [65, 65, 65] and pruned["tokens_per_block"] == [65, 17, 17]
    for run in (base, pruned):
        assert (run["warmup_batches"], run["steady_batches"], run["partial_batches"]) == (2, 2, 4)
        assert run["images_per_s"] == pytest.approx(8 / run["steady_seconds"], rel=0.02)
    assert report["speedup"]["images_per_s"] == pytest.approx(pruned["images_per_s"] / base["images_per_s"], abs=2e-3)
