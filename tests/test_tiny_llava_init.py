"""train_tiny_llava.py --init (vlm/pretrain.py): continuing a saved tiny LLaVA starts from its exact weights and
architecture, records the init file's sha256 and total_steps, keeps the init file whole when continuing in its own
folder, and refuses a contradicting architecture flag or a foreign file in one line, exit 2, nothing written."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from utils import checkpoint  # noqa: E402
from vlm.pretrain import initial_model, load_tiny_llava, main, parse_args, resolve_architecture  # noqa: E402

# 28-px images (4 vision tokens), 2 + 1 layers at width 32: one run of 2 steps takes about a second on a CPU thread
TINY = ["--batch_size", "4", "--warmup", "1", "--train_images", "64", "--val_images", "16", "--eval_images", "4",
        "--eval_every", "100", "--workers", "0", "--no_progress"]
ARCH = ["--hidden_size", "32", "--num_layers", "2", "--vision_hidden_size", "32", "--vision_layers", "1",
        "--image_size", "28"]


def _run(data, out, *extra):
    return main(["--data", data, "--out", str(out), *TINY, *extra])


def _summary(folder):
    return json.loads((folder / "tiny_llava.json").read_text())


@pytest.fixture(scope="module")
def two_step(cifar10_root, tmp_path_factory, one_thread):
    """A tiny LLaVA trained for 2 steps from a random init: (data root, its folder)."""
    folder = tmp_path_factory.mktemp("two_step")
    assert _run(cifar10_root, folder, "--steps", "2", *ARCH) == 0
    return cifar10_root, folder


def test_architecture_defaults_stay_without_init():
    args = parse_args([])
    assert (args.init, args.hidden_size, args.num_heads) == (None, None, None)  # left out, resolved later
    resolve_architecture(args)
    assert [args.hidden_size, args.num_layers, args.vision_hidden_size, args.vision_layers, args.num_heads,
            args.image_size] == [128, 32, 128, 4, 4, 336]
    args = parse_args(["--hidden_size", "64"])
    resolve_architecture(args)
    assert (args.hidden_size, args.num_layers) == (64, 32)


def test_initial_weights_are_the_checkpoints(two_step):
    data, folder = two_step
    path = str(folder / "tiny_llava.pt")
    args = parse_args(["--data", data, "--init", path, "--num_layers", "2"])  # repeating its value is allowed
    model, tokenizer, init = initial_model(args)
    saved = checkpoint.load_file(path)
    assert init == {"path": path, "sha256": checkpoint.sha256_of(path), "step": 2}
    state = model.state_dict()
    assert sorted(state) == sorted(saved["model"])
    assert all(torch.equal(state[k], v) for k, v in saved["model"].items())
    assert model.training and list(tokenizer.words) == saved["tokenizer"]
    assert [args.hidden_size, args.num_layers, args.vision_hidden_size, args.vision_layers, args.num_heads,
            args.image_size] == [32, 2, 32, 1, 4, 28]


def test_continue_two_more_steps(two_step, tmp_path):
    data, folder = two_step
    path = str(folder / "tiny_llava.pt")
    sha = checkpoint.sha256_of(path)
    out = tmp_path / "more"
    assert _run(data, out, "--steps", "2", "--init", path) == 0
    summary = _summary(out)
    assert (summary["steps"], summary["total_steps"]) == (2, 4)
    assert summary["init"] == {"path": path, "sha256": sha, "step": 2}
    assert summary["fingerprint"] == _summary(folder)["fingerprint"] and summary["args"]["image_size"] == 28
    model, _, payload = load_tiny_llava(str(out / "tiny_llava.pt"))
    assert payload["step"] == 4 and payload["metrics"]["total_steps"] == 4
    assert payload["metrics"]["init"] == summary["init"]
    before = checkpoint.load_file(path)["model"]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it did train
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(r["step"], r["total_steps"]) for r in records] == [(2, 4)]
    assert checkpoint.sha256_of(path) == sha  # the init file is untouched


def test_continue_in_the_init_folder_keeps_the_init_until_replaced(two_step, tmp_path, monkeypatch):
    data, _ = two_step
    first = tmp_path / "run"
    assert _run(data, first, "--steps", "2", *ARCH) == 0
    path = str(first / "tiny_llava.pt")
    sha = checkpoint.sha256_of(path)

    def no_disk(fd):
        raise OSError(28, "No space left on device")

    # the new checkpoint's write fails at its fsync: the init file is still the old one, no temp file is left
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.os, "fsync", no_disk)
        with pytest.raises(OSError, match="No space left"):
            _run(data, first, "--steps", "2", "--init", path)
    assert checkpoint.sha256_of(path) == sha and load_tiny_llava(path)[2]["step"] == 2
    assert not [name for name in os.listdir(first) if name.startswith(".tmp-")]
    # a write that succeeds replaces it; metrics.jsonl keeps the first run's records and appends
    assert _run(data, first, "--steps", "2", "--init", path) == 0
    assert load_tiny_llava(path)[2]["step"] == 4 and checkpoint.sha256_of(path) != sha
    assert _summary(first)["init"]["sha256"] == sha
    records = [json.loads(line) for line in open(first / "metrics.jsonl")]
    assert [r["total_steps"] for r in records] == [2, 4, 4]  # first run, the failed run, the continued run


def test_conflicting_architecture_flag_is_refused(two_step, tmp_path, capsys):
    data, folder = two_step
    path = str(folder / "tiny_llava.pt")
    out = tmp_path / "refused"
    assert _run(data, out, "--steps", "2", "--init", path, "--hidden_size", "64") == 2
    err = capsys.readouterr().err
    assert err == (f"error: --hidden_size 64: differs from the --init checkpoint {path} (hidden_size 32); "
                   f"leave it out to continue that model\n")
    assert not out.exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "notes.txt").write_text("not a checkpoint\n"), "not a loadable checkpoint"),
    (lambda d: checkpoint.save(str(d / "notes.txt"), {"format": "imp-runner/1"}), "not a tiny LLaVA checkpoint"),
    (lambda d: None, "no such checkpoint file"),
])
def test_non_checkpoint_init_is_refused(cifar10_root, tmp_path, capsys, make, message):
    make(tmp_path)
    path = str(tmp_path / "notes.txt")
    out = tmp_path / "refused"
    assert _run(cifar10_root, out, "--steps", "2", "--init", path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --init {path}: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_fresh_run_never_overwrites_a_trained_model(two_step, capsys):
    """Without --init (or with --init of another file), an --out holding tiny_llava.pt is refused: exit 2,
    one line naming --out and the --init that would continue it, the file and its metrics untouched."""
    data, folder = two_step
    path = folder / "tiny_llava.pt"
    before = {name: checkpoint.sha256_of(str(folder / name)) for name in ("tiny_llava.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert _run(data, folder, "--steps", "1", *ARCH) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {folder}: holds a trained tiny_llava.pt; continue it with --init {path}, " \
                  f"or choose another --out"
    other = folder.parent / "elsewhere.pt"
    other.write_bytes(path.read_bytes())
    assert _run(data, folder, "--steps", "1", "--init", str(other)) == 2
    assert {name: checkpoint.sha256_of(str(folder / name)) for name in before} == before
