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


def run_main(*args, timeout=600, check=True):
    """Run main_imp_fillback.py in a subprocess; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "main_imp_fillback.py"), *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


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
