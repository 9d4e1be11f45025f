"""The install: the core requirements run the README demo without any extra, and the requirement
files, pyproject.toml's extras and its package list agree (README "Install")."""
import json
import os
import subprocess
import sys

import pytest

from conftest import EXTRA_PACKAGES, ROOT
from utils import paths

CORE_FILE, ALL_FILE = os.path.join(ROOT, "requirements-core.txt"), os.path.join(ROOT, "requirements.txt")


def requirement_lines(path: str) -> list:
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_core_install_runs_the_demo_without_any_extra(core_run):
    directory, result = core_run
    assert result.returncode == 0, result.stderr[-3000:]
    # tracking was asked for (no --no_wandb) and falls back to the run dir's own files
    assert "warning: wandb is not installed: logging to metrics.jsonl and log.txt only" in result.stderr
    assert "Traceback" not in result.stderr
    rounds = [json.loads(line) for line in open(paths.metrics_file(directory))]
    rounds = [r for r in rounds if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["remaining_pct"] == 100.0 and 45.0 < rounds[1]["remaining_pct"] < 55.0  # --rate 0.5
    assert all(os.path.isfile(paths.round_checkpoint(directory, k)) for k in (0, 1))


def test_the_extras_are_unimportable_in_the_core_run_child():
    # the core_run child sees every extra as missing: were one imported at module level, the run would fail
    code = ("import sys; sys.modules.update(dict.fromkeys(%r)); import importlib\n"
            "for name in %r:\n"
            "    try: importlib.import_module(name); print(name)\n"
            "    except ImportError: pass") % (EXTRA_PACKAGES, EXTRA_PACKAGES)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == ""


def test_requirement_files_match_pyproject():
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    assert requirement_lines(CORE_FILE) == project["dependencies"]
    everything = requirement_lines(ALL_FILE)
    assert everything[0] == "-r requirements-core.txt"
    names = ("tokens", "regroup", "tracking", "reports", "vlm", "lowrank", "sweeps", "compact", "dev")
    listed = [r for name in names for r in extras[name]]
    assert everything[1:] == [r for i, r in enumerate(listed) if r not in listed[:i]]  # each package once
    assert extras["all"] == [f"imp-runner[{','.join(names)}]"]
    optional = " ".join(r for name, reqs in extras.items() for r in reqs).lower()
    core = " ".join(project["dependencies"]).lower()
    for package in ("open_clip", "clip_benchmark", "pymetis", "wandb", "matplotlib", "pytest", "hypothesis",
                    "transformers", "pyyaml", "safetensors", "peft", "submitit"):
        assert package in optional and package not in core, package


def test_pyproject_packages_every_code_folder_and_top_level_script():
    tool = pyproject()["tool"]["setuptools"]
    folders = sorted(d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py")))
    assert sorted(tool["packages"] + ["benchmarks"]) == folders  # benchmarks/ runs from a checkout only
    scripts = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
    assert sorted(tool["py-modules"]) == scripts
