"""clip_prune.py: flag errors, and a clip_benchmark zero-shot run with a random tiny CLIP on local data."""
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tokens.clip_eval import MODEL_TYPE, main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags, message", [
    (["--k_anchors", "-1"], "--k_anchors must be >= 0, got -1"),
    (["--top_m", "-3"], "--top_m must be >= 0, got -3"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1], got 1.5"),
    (["--alpha", "x"], "argument --alpha: invalid float value: 'x'"),
    (["--model", "ViT-B-32", "--enable_pruning", "--k_anchors", "10", "--top_m", "50"],
     "--k_anchors 10 + --top_m 50 + 1 (CLS) = 61 must be below the 50 tokens of ViT-B-32"),
    (["--enable_pruning", "--top_m", "20", "--model_type", "open_clip"], "--model_type open_clip: pruning needs"),
])
def test_bad_values_exit_2_with_one_line(flags, message, capsys):
    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("clip_prune.py: error:")


def test_script_exit_code_is_2():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "clip_prune.py"), "--alpha", "-0.5"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "clip_prune.py: error: --alpha must be in [0, 1], got -0.5"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from tokens.smoke import write_tiny_data, write_tiny_model
    folder = tmp_path_factory.mktemp("smoke")
    return write_tiny_model(str(folder / "model")), write_tiny_data(str(folder / "data"), images=20), folder


def evaluate(smoke, output, *extra):
    model, data, _ = smoke
    return main(["--model", model, "--pretrained", "", "--dataset", "wds/cifar10", "--dataset_root", data,
                 "--task", "zeroshot_classification", "--output", str(output), "--num_workers", "0", "--no_amp",
                 "--batch_size", "8", "--quiet", *extra])


def test_zero_shot_baseline_and_pruned(smoke):
    folder = smoke[2]
    assert evaluate(smoke, folder / "baseline.json") == 0
    attention = folder / "attention.pt"
    assert evaluate(smoke, folder / "pruned.json", "--enable_pruning", "--k_anchors", "4", "--top_m", "12",
                    "--alpha", "0.5", "--extract_attention", "--attention_output", str(attention)) == 0
    from clip_benchmark import models
    assert MODEL_TYPE in models.MODEL_TYPES and MODEL_TYPE in models.TYPE2FUNC

    base = json.loads((folder / "baseline.json").read_text())
    pruned = json.loads((folder / "pruned.json").read_text())
    for result in (base, pruned):
        assert {"acc1", "acc5", "mean_per_class_recall"} <= set(result["metrics"])
        assert 0.0 <= result["metrics"]["acc1"] <= result["metrics"]["acc5"] <= 1.0
        assert result["token_pruning"]["images"] == 20 and result["token_pruning"]["images_per_s"] > 0
    assert base["token_pruning"]["tokens_per_block"] == [65, 65, 65]
    assert pruned["token_pruning"]["tokens_per_block"] == [65, 17, 17]
    assert pruned["token_pruning"]["mean_tokens_per_block"] == 33.0

    record = torch.load(attention, weights_only=True)
    assert record["format"] == "anchor-token-attention/1" and record["num_images"] == 20
    assert record["meta"]["k_anchors"] == 4 and record["meta"]["pruning"] is True
    assert record["blocks"].tolist() == [0, 1, 2]
    assert [t.shape for t in record["cls_attention"]] == [(20, 65), (20, 65), (20, 17)]
    assert torch.allclose(record["cls_attention"][1].sum(1), torch.ones(20), atol=1e-4)
    kept = record["kept_positions"][1]
    assert kept.shape == (20, 17) and (kept[:, 0] == 0).all() and torch.equal(kept, kept.sort(1).values)
    assert torch.equal(record["token_positions"][2], kept)
    anchors = record["anchor_positions"][1]
    assert anchors.shape == (20, 4) and all(set(a.tolist()) <= set(k.tolist()) for a, k in zip(anchors, kept))
    assert len({tuple(row.tolist()) for row in kept}) > 1  # per-sample choices


def test_report_prints_both_runs_side_by_side(smoke, capsys):
    from tokens.report import main as report
    folder = smoke[2]
    if not (folder / "pruned.json").exists():
        pytest.skip("needs test_zero_shot_baseline_and_pruned")
    report([str(folder / "baseline.json"), str(folder / "pruned.json")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["baseline", "pruned"]
    assert lines[[l.split()[0] for l in lines].index("tokens")].split()[-2:] == ["65x1", "17x2"]
