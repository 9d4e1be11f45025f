"""Feature cache, extraction (resume, CLI) and encoders (issue 12). Baselines, compare_svd_nn and plots:
test_lowrank_compare.py."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from lowrank import extract
from lowrank.cache import FeatureCache, read_index, resume_point, split_indices, write_cache
from lowrank.encoders import Encoder, build_encoder
from utils import checkpoint
from utils.config import RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cache(path, samples, encoder="synthetic-encoder"):
    write_cache(str(path), encoder, {"seed": 0}, list(samples), shard_size=7, dtype=torch.float32)
    return FeatureCache(str(path))


def runner_checkpoint(path, dataset="synthetic"):
    """A round checkpoint of vit_tiny (10 classes), written as the runner writes one, half of its qkv
    weights masked."""
    config = RunConfig(arch="vit_tiny", dataset=dataset)
    from models import create_model as create_classifier
    torch.manual_seed(0)
    model = create_classifier("vit_tiny", 10)
    masks = {name: torch.rand_like(p) > 0.5 for name, p in model.named_parameters() if name.endswith("qkv.weight")}
    save_round_checkpoint(path, model, config, 1, masks)
    return masks


def save_round_checkpoint(path, model, config, round_index, masks=None):
    """Write `model` as the runner writes the round checkpoint of `round_index` of a run with `config`."""
    checkpoint.save(str(path), {"format": checkpoint.FORMAT, "kind": "round", "round": round_index, "epoch": 1,
                                "model": model.state_dict(), "masks": masks or {}, "config": config.to_dict(),
                                "config_hash": config.config_hash(),
                                "lineage": checkpoint.lineage_record(config.config_hash(), None, None)})


def synthetic_batch():
    """Two uint8 images [2, 3, 32, 32] and the same normalised as the synthetic dataset does."""
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    return images, (images.float() / 255 - 0.5) / 0.25


# --- cache ---------------------------------------------------------------------------------------------------

def test_cache_round_trip_and_split(tmp_path):
    samples = torch.randn(17, 5, 3)
    cache = make_cache(tmp_path / "c", samples)
    assert (len(cache), cache.shape, cache.encoder) == (17, (5, 3), "synthetic-encoder")
    assert [s["count"] for s in cache.index["shards"]] == [7, 7, 3]
    assert torch.equal(cache[9], samples[9]) and torch.equal(cache[-1], samples[16])
    assert torch.equal(cache.load_all(), samples)
    train, val = FeatureCache.split_indices(17, 0.1, 0)
    assert len(val) == 2 and sorted(train.tolist() + val.tolist()) == list(range(17))
    assert torch.equal(split_indices(17)[1], val) and not torch.equal(split_indices(17, seed=1)[1], val)
    with pytest.raises(IndexError, match="sample 17 out of range"):
        cache[17]


def test_cache_float16_and_errors(tmp_path):
    samples = torch.randn(3, 4, 2)
    write_cache(str(tmp_path / "h"), "e", {}, samples, shard_size=2)
    assert torch.allclose(FeatureCache(str(tmp_path / "h"))[2], samples[2], atol=2e-3)
    with pytest.raises(ValueError, match="of another|encoder 'e' is there, this run uses 'f'"):
        resume_point(str(tmp_path / "h"), "f", {})
    with pytest.raises(ValueError, match="sample 1 has shape \\[4, 3\\], expected \\[4, 2\\]"):
        write_cache(str(tmp_path / "bad"), "e", {}, [torch.zeros(4, 2), torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="no such feature cache directory"):
        FeatureCache(str(tmp_path / "missing"))


class CountingEncoder(Encoder):
    """Features [4, 3] that are a function of the image; counts the images it encodes."""

    def __init__(self):
        super().__init__(name="counting", config={"v": 1}, image_size=8, forward=None, normalise=False)
        self.seen = 0

    def encode(self, images):
        self.seen += len(images)
        return images.float()[:, 0, :4, :3]


def test_killed_extraction_resumes_without_recomputing_done_shards(tmp_path):
    images = torch.randint(0, 255, (23, 3, 8, 8), dtype=torch.uint8)
    reads = []

    def read(start, stop):
        reads.append(start)
        if len(reads) == 4 and not hasattr(read, "killed"):
            read.killed = True
            raise KeyboardInterrupt  # the kill: batches 0..2 (12 images) were encoded, shard 0 (10) written
        return images[start:stop]
    source = extract.ImageSource(len(images), read, {"dataset": "memory"})
    out, first = str(tmp_path / "cache"), CountingEncoder()
    with pytest.raises(KeyboardInterrupt):
        extract.extract(source, first, out, batch_size=4, shard_size=10, dtype=torch.float32, progress=False)
    index = read_index(out)
    assert (index["complete"], index["count"]) == (False, 10)
    assert [s["done"] for s in index["shards"]] == [True, False, False]
    with pytest.raises(ValueError, match="extraction not finished \\(10 samples so far\\)"):
        FeatureCache(out)
    second = CountingEncoder()
    extract.extract(source, second, out, batch_size=4, shard_size=10, dtype=torch.float32, progress=False)
    assert second.seen == 13 and reads[4] == 10  # images 10..22 only: shard 0 was not recomputed
    assert torch.equal(FeatureCache(out).load_all(), images.float()[:, 0, :4, :3])
    third = CountingEncoder()
    extract.extract(source, third, out, batch_size=4, shard_size=10, dtype=torch.float32, progress=False)
    assert third.seen == 0


def test_extract_cli_refuses_another_encoder_and_empty_input(tmp_path, capsys):
    out = str(tmp_path / "cache")
    args = ["--dataset", "synthetic", "--out", out, "--limit", "6", "--batch_size", "3", "--shard_size", "4",
            "--img_size", "32", "--no_progress"]
    assert extract.main(["--encoder", "vit_tiny_patch16_224", *args]) == 0
    assert FeatureCache(out).shape == (5, 192)  # 2 x 2 patches of 16 px + the class token
    capsys.readouterr()
    assert extract.main(["--encoder", "vit_small_patch16_224", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "encoder 'timm:vit_tiny_patch16_224' is there" in err and out in err
    assert extract.main(["--encoder", "vit_tiny_patch16_224", "--out", out, "--limit", "0"]) == 2
    assert "--limit 0: must be at least 1" in capsys.readouterr().err
    missing = tmp_path / "none.pth.tar"
    assert extract.main(["--encoder", f"runner:{missing}", "--out", out]) == 2
    assert capsys.readouterr().err == f"error: --encoder runner:{missing}: no such checkpoint file\n"


def test_extract_from_an_image_folder_and_cifar10(tmp_path, cifar10_root):
    from PIL import Image
    folder = tmp_path / "photos" / "sub"
    folder.mkdir(parents=True)
    for i, size in enumerate((40, 20, 32)):
        Image.new("RGB", (size, size + 3), (60 * i, 10, 200)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = str(tmp_path / "folder_cache")
    assert extract.main(["--encoder", "vit_tiny_patch16_224", "--img_size", "32", "--dataset", "folder",
                         "--data", str(tmp_path / "photos"), "--out", out, "--no_progress"]) == 0
    cache = FeatureCache(out)
    assert (len(cache), cache.shape, cache.index["encoder_config"]["files"]) == (3, (5, 192), 3)
    path = tmp_path / "c10.pth.tar"
    runner_checkpoint(path, dataset="cifar10")
    out = str(tmp_path / "c10_cache")
    assert extract.main(["--encoder", f"runner:{path}", "--dataset", "cifar10", "--data", cifar10_root,
                         "--split", "test", "--limit", "4", "--out", out, "--no_progress"]) == 0
    assert FeatureCache(out).shape == (65, 192) and FeatureCache(out).index["encoder_config"]["split"] == "test"


# --- encoders ------------------------------------------------------------------------------------------------

def test_runner_checkpoint_encoder_gives_65_by_192_with_masks(tmp_path):
    path = tmp_path / "1checkpoint.pth.tar"
    masks = runner_checkpoint(path)
    encoder = build_encoder(f"runner:{path}")
    model = encoder.modules[0]
    qkv = dict(model.named_parameters())["blocks.0.attn.qkv.weight"]
    assert bool((qkv[~masks["blocks.0.attn.qkv.weight"]] == 0).all()) and bool((qkv != 0).any())
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    features = encoder.encode(images)
    assert features.shape == (2, 65, 192) and encoder.config["arch"] == "vit_tiny"


def test_runner_extraction_cli_cache_shape(tmp_path):
    path = tmp_path / "1checkpoint.pth.tar"
    runner_checkpoint(path)
    out = str(tmp_path / "cache")
    assert extract.main(["--encoder", f"runner:{path}", "--dataset", "synthetic", "--out", out, "--limit", "3",
                         "--no_progress"]) == 0
    cache = FeatureCache(out)
    assert cache.shape == (65, 192) and len(cache) == 3 and cache.index["encoder_config"]["dataset"] == "synthetic"


def test_hf_clip_vision_tower(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(str(tmp_path / "clip"))
    encoder = build_encoder(f"hf:{tmp_path / 'clip'}")
    assert encoder.encode(torch.randint(0, 255, (2, 3, 20, 20), dtype=torch.uint8)).shape == (2, 17, 32)


def test_hf_qwen25_vl_vision_tower(tmp_path):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    config = Qwen2_5_VLVisionConfig(depth=1, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=48,
                                    fullatt_block_indexes=[0], window_size=112)
    Qwen2_5_VisionTransformerPretrainedModel._from_config(config).save_pretrained(str(tmp_path / "qwen"))
    encoder = build_encoder(f"hf:{tmp_path / 'qwen'}", img_size=56)  # 4 x 4 patches of 14 px, merged 2 x 2
    assert encoder.encode(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 4, 48)


@pytest.mark.slow
def test_scripts_end_to_end_with_a_killed_extraction(tmp_path):
    """The issue's commands as subprocesses: extract_features.py killed after its first shard, rerun
    (resumes), compare_svd_nn.py, visualize_svd_nn.py --image_idx."""
    path = tmp_path / "1checkpoint.pth.tar"
    runner_checkpoint(path)
    out = str(tmp_path / "cache")
    command = [sys.executable, os.path.join(ROOT, "extract_features.py"), "--encoder", f"runner:{path}",
               "--dataset", "synthetic", "--out", out, "--limit", "48", "--batch_size", "4", "--shard_size", "8"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (read_index(out) or {}).get("count"):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = read_index(out)["count"]
    assert 8 <= done < 48
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and f"resuming {out} at image {done} of 48" in resumed.stderr
    assert len(FeatureCache(out)) == 48
    for script, extra in (("compare_svd_nn.py", []), ("visualize_svd_nn.py", ["--image_idx", "3"])):
        result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--features", out, "--results_dir",
                                 str(tmp_path / "results"), *extra], cwd=ROOT, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr
    assert os.path.isfile(tmp_path / "results" / "compare_svd_nn.md")
    assert os.path.isfile(tmp_path / "results" / "visualize" / "image3_errors.png")


def test_runner_encoder_rebuilds_struct_lowrank_layers(tmp_path):
    """A --struct lowrank checkpoint holds factorised layers (`.down` / `.up`): the encoder rebuilds them."""
    from models import create_model as create_classifier
    from pruners.factorise import factorise, replace_module
    config = RunConfig(arch="vit_tiny", dataset="synthetic", struct="lowrank", prune_type="pt")
    torch.manual_seed(0)
    model = create_classifier("vit_tiny", 10).eval()
    replace_module(model, "blocks.0.attn.qkv", factorise(model.blocks[0].attn.qkv, 20))
    path = tmp_path / "1checkpoint.pth.tar"
    save_round_checkpoint(path, model, config, 1)
    encoder = build_encoder(f"runner:{path}")
    images, x = synthetic_batch()
    with torch.no_grad():
        assert torch.allclose(encoder.encode(images), model.forward_features(x), atol=1e-5)


def test_runner_encoder_rebuilds_the_struct_merge_merger_at_its_round(tmp_path):
    """A --struct merge checkpoint of round 2 (rate 0.5: 64 patches merged into 16 centres) holds the merger:
    the encoder rebuilds it with that round's centres and temperature and gives [1 + 16, 192] tokens."""
    from models import create_model as create_classifier
    from pruners.base import PruneContext
    from pruners.merge import TokenMerging
    config = RunConfig(arch="vit_tiny", dataset="synthetic", struct="merge", prune_type="pt", rate=0.5,
                       pruning_times=3)
    torch.manual_seed(0)
    model = create_classifier("vit_tiny", 10)
    mode = TokenMerging(config)
    mode.check_model(model)
    mode.plan_round(PruneContext(model=model, weights={}, config=config, round_index=2,
                                 calibration_batches=lambda: iter(()), log=lambda message: None), {})
    mode.configure_model(model, 2, lambda message: None)
    path = tmp_path / "2checkpoint.pth.tar"
    save_round_checkpoint(path, model, config, 2)
    encoder = build_encoder(f"runner:{path}")
    images, x = synthetic_batch()
    features = encoder.encode(images)
    assert features.shape == (2, 17, 192)
    with torch.no_grad():
        assert torch.allclose(features, model.eval().forward_features(x), atol=1e-5)
