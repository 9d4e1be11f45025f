import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FAST = ["--dataset", "synthetic", "--arch", "res20s", "--no_wandb", "--no_progress", "--batch_size", "64",
        "--lr", "0.05"]


def run_main(*args, timeout=600, check=True, wandb_env="disabled"):
    """Run main_imp_fillback.py in a subprocess; returns the CompletedProcess. WANDB_MODE is set to
    `wandb_env` there (None: left unset, so --wandb_mode decides)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env["PYTHONUNBUFFERED"] = "1"
    if wandb_env is not None:
        env["WANDB_MODE"] = wandb_env
    result = subprocess.run([sys.executable, os.path.join(ROOT, "main_imp_fillback.py"), *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def read_jsonl(path):
    """The records of a JSON-lines file (metrics.jsonl), in order."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_refused(argv, save_dir, capsys, message):
    """main_imp_fillback's main(argv + --save_dir) exits 2 with one stderr line starting with `message`, and
    writes nothing (no `save_dir`)."""
    from utils.cli import main
    assert main([*argv, "--save_dir", save_dir]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(message) and stderr.count("\n") == 1, stderr
    assert not os.path.exists(save_dir)


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    """The shared CIFAR-10 bundle materialised as cifar-10-batches-py (skipped when absent)."""
    script = os.path.join(SHARED_DATA, "materialize_cifar10.py")
    if not os.path.isfile(script):
        pytest.skip(f"CIFAR-10 bundle not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("cifar10")
    subprocess.run([sys.executable, script, "--out", str(out)], check=True, capture_output=True)
    return str(out)


def kill_run_when(args, directory, predicate, timeout=300):
    """Start main_imp_fillback.py with `args --save_dir directory` and SIGKILL it as soon as a
    metrics.jsonl record satisfies `predicate`."""
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "main_imp_fillback.py"), *map(str, args),
                                "--save_dir", directory], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = os.path.join(directory, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(metrics):
            with open(metrics) as f:
                records = [json.loads(line) for line in f if line.endswith("\n")]
            if any(predicate(r) for r in records):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the run never reached the kill point")


# the packages of pyproject.toml's extras (tokens, regroup, tracking, reports, vlm, lowrank, dev) that a core install
# lacks (pyyaml and safetensors come with timm)
EXTRA_PACKAGES = ("open_clip", "clip_benchmark", "pymetis", "wandb", "matplotlib", "pytest", "hypothesis", "transformers",
                  "peft", "submitit")
CORE_RUN_ARGS = ["--dataset", "synthetic", "--arch", "res20s", "--pruning_times", "2", "--epochs", "1",
                 "--rate", "0.5", "--batch_size", "64", "--lr", "0.05", "--val_size", "2400", "--no_progress"]


def run_main_core_install(*args, timeout=600):
    """run_main in a child where the extras' packages cannot be imported (`import wandb` raises
    ImportError there), as after `pip install -r requirements-core.txt`; returns the CompletedProcess."""
    blocker = (f"import sys; sys.modules.update(dict.fromkeys({EXTRA_PACKAGES!r})); "
               f"sys.argv[0] = 'main_imp_fillback.py'; from utils.cli import main; sys.exit(main())")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # WANDB_MODE=disabled would skip the import
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run([sys.executable, "-c", blocker, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def core_run(tmp_path_factory):
    """One finished run for every test that only reads a run dir (about 10 s on 2 cores): the README
    demo made small (res20s, default --struct rsst, 2 rounds x 1 epoch, --rate 0.5, 600 training
    images), run WITHOUT --no_wandb and as on a core install (run_main_core_install). Returns
    (run dir, CompletedProcess); the run dir is shared: copy it before changing anything in it."""
    directory = str(tmp_path_factory.mktemp("core_run") / "run")
    return directory, run_main_core_install(*CORE_RUN_ARGS, "--save_dir", directory)


@pytest.fixture(scope="module")
def one_thread():
    """In-process runs on one torch thread for a test module (two threads on two cores shared with
    other work crawl); the previous setting is restored for the other modules."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
