"""clip_prune.py as users run it (issue 16 §7, §8): the README's wds command with clip_benchmark's default
4 loader workers, `local-dir:` models without --output, paths checked before the evaluation, offline
`--pretrained` tags and truncated weight files in one line with exit 2."""
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import open_clip  # noqa: E402,F401  (imported up front: the offline answer is timed without it)
import pytest  # noqa: E402
import torch  # noqa: E402

from tokens import clip_weights  # noqa: E402
from tokens.clip_eval import CliError, Session, build_parser, main  # noqa: E402
from tokens.clip_paths import output_path, wds_workers  # noqa: E402
from utils.writable import PathError  # noqa: E402
from tokens.smoke import TINY_CLIP, write_tiny_model  # noqa: E402
from tokens.wds_data import main as write_wds_main  # noqa: E402


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clip_prune.py: error: "), err
    return err[0]


def test_readme_wds_command_with_default_workers_and_local_dir_model_without_output(tmp_path, monkeypatch, capsys):
    """The README example's shape: a wds set written by tokens.wds_data, clip_benchmark's default
    --num_workers 4, and (the recommended offline model) local-dir: with no --output."""
    data = tmp_path / "wds_cifar10"
    assert write_wds_main(["--synthetic", "24", "--out", str(data), "--templates", "1"]) == 0
    assert int((data / "test" / "nshards.txt").read_text()) == 12  # 16 asked, at most 2 images a shard here
    model = write_tiny_model(str(tmp_path / "model"))
    monkeypatch.chdir(tmp_path)
    assert main(["--model", model, "--pretrained", "", "--dataset", "wds/cifar10", "--dataset_root", str(data),
                 "--task", "zeroshot_classification", "--batch_size", "4", "--no_amp", "--quiet",
                 "--enable_pruning", "--k_anchors", "4", "--top_m", "12"]) == 0
    name = f"cifar10__local-dir_{str(tmp_path / 'model').strip('/').replace('/', '_')}_en_zeroshot_classification.json"
    result = json.loads((tmp_path / name).read_text())  # before: FileNotFoundError after the whole evaluation
    stats = result["token_pruning"]
    assert stats["images"] == 24 and stats["tokens_per_block"] == [65, 17, 17]
    # 4 workers x 3 shards x 2 images: each worker gives a batch of 4 and a partial one of 2
    assert (stats["warmup_batches"], stats["steady_batches"], stats["partial_batches"]) == (2, 2, 4)
    assert stats["steady_images"] == 8 and stats["images_per_s"] > 0
    assert "steady state" in capsys.readouterr().out


def test_result_names_built_from_model_and_dataset_names_are_safe():
    template = "{dataset}_{pretrained}_{model}_{language}_{task}.json"
    assert (output_path(template, "local-dir:/a/b", "", "wds/cifar10", "en", "zeroshot_classification")
            == "cifar10__local-dir_a_b_en_zeroshot_classification.json")
    assert output_path("out/{model}-{pretrained}-{dataset}.json", "hf-hub:org/x", "no/such/file.pt", "wds/a/b",
                       "en", "t") == "out/hf-hub_org_x-no_such_file.pt-a_b.json"  # the template's own folder stays


def test_loader_workers_are_capped_at_the_shard_count(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "nshards.txt").write_text("1\n")
    assert wds_workers(["wds/cifar10"], str(tmp_path), "test", 4) == 1
    assert wds_workers(["wds/cifar10"], str(tmp_path), "test", 1) is None
    assert wds_workers(["cifar10"], str(tmp_path), "test", 4) is None
    with pytest.raises(PathError, match=r"--dataset_root .*wds/cifar10 needs .*train/nshards.txt"):
        wds_workers(["wds/cifar10"], str(tmp_path), "train", 4)


@pytest.mark.parametrize("flags, message", [
    (["--output", "/no/such/folder/r.json"], "--output /no/such/folder/r.json: folder /no/such/folder does not exist"),
    (["--output", "{tmp}"], "is a folder, expected a file path"),
    (["--extract_attention", "--attention_output", "{tmp}"], "--attention_output"),
])
def test_unwritable_paths_stop_before_any_work(flags, message, tmp_path, capsys):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    start = time.perf_counter()
    assert main(["--model", "ViT-B-32", "--pretrained", "", *flags]) == 2
    assert time.perf_counter() - start < 20  # no model is built, no data read
    assert message in one_error_line(capsys)


def test_offline_pretrained_tag_is_one_line_exit_2_and_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["--model", "ViT-B-16", "--pretrained", "openai", "--model_cache_dir", str(tmp_path)]) == 2
    assert time.perf_counter() - start < 10  # was 55 s of retries and a 40-line traceback
    line = one_error_line(capsys)
    assert line.startswith("clip_prune.py: error: --pretrained openai: the weights of ViT-B-16 are not in the cache")
    assert "HF_HUB_OFFLINE is set" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(clip_weights, "reachable", lambda host, **kw: False)  # no network, no flag
    assert main(["--model", "ViT-B-16", "--pretrained", "openai", "--model_cache_dir", str(tmp_path)]) == 2
    assert "huggingface.co and openaipublic.azureedge.net cannot be reached" in one_error_line(capsys)
    assert main(["--model", "ViT-B-16", "--pretrained", "no_such_tag"]) == 2
    assert "--pretrained no_such_tag: not a file and not a known tag of ViT-B-16 (tags: openai" in one_error_line(capsys)


def test_truncated_weights_file_is_one_complete_line(tmp_path):
    config = tmp_path / "TinyClipH3.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    weights = tmp_path / "weights.pt"
    torch.save(open_clip.create_model("TinyClipH3").state_dict(), weights)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    session = Session(build_parser().parse_args([]))
    with pytest.raises(CliError) as info:
        session.load("TinyClipH3", str(weights))
    message = str(info.value)
    assert message.startswith(f"--pretrained {weights}: could not build TinyClipH3 with weights")
    assert "\n" not in message and message.endswith("must be deleted and fetched again")


def test_missing_clip_packages_give_one_line_and_exit_2():
    import subprocess
    import sys
    code = ("import sys; sys.modules.update(dict.fromkeys(('open_clip', 'clip_benchmark'))); "
            "from tokens.clip_eval import main; sys.exit(main(['--dataset', 'cifar10']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "clip_prune.py: error: open_clip and clip_benchmark not installed; pip install '.[tokens]' "
        "(open_clip_torch, clip_benchmark)"]
