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
    assert {(r["model"].split()[0], r["batch"], r["mode"]) for r in rows} == {
        (lib, b, m) for lib in ("open_clip", "timm") for b in (1, 4) for m in ("baseline", "pruned")}
    for row in rows:
        expected = [197] * 4 if row["mode"] == "baseline" else [197] + [61] * 3
        assert row["tokens_per_block"] == expected and row["median_ms"] > 0 and row["images_per_s"] > 0
        if row["mode"] == "pruned":
            assert row["ideal_speedup"] > 1.5 and row["achieved_of_ideal"] == pytest.approx(
                row["speedup"] / row["ideal_speedup"], abs=2e-3)
    assert "speedup" in proc.stdout and "wrote" in proc.stdout


@pytest.mark.slow
def test_prune_test_script_passes():
    proc = subprocess.run(["bash", os.path.join(ROOT, "prune_test.sh")], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "prune_test: OK" in proc.stdout
