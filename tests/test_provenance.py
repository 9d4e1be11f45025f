"""provenance.json: one record per process that starts or resumes a run, with the command line, package
versions, GPUs and the git commit + dirty flag."""
import importlib.metadata
import json
import os

from utils import paths, provenance
from utils.checkpoint import git_commit


def test_each_start_appends_a_record_with_command_versions_and_git(tmp_path):
    directory = str(tmp_path)
    first = provenance.record_start(directory, ["main_imp_fillback.py", "--arch", "res20s"])
    second = provenance.record_start(directory, ["main_imp_fillback.py", "--arch", "res20s", "--resume"])
    with open(paths.provenance_file(directory)) as f:
        starts = json.load(f)["starts"]
    assert starts == [first, second]
    assert second["command"][1:] == ["main_imp_fillback.py", "--arch", "res20s", "--resume"]
    assert second["packages"]["torch"] == importlib.metadata.version("torch")
    assert second["packages"]["timm"] == importlib.metadata.version("timm")
    assert second["git"]["commit"] == git_commit()
    assert isinstance(second["git"]["dirty"], bool) or second["git"]["commit"] is None
    assert isinstance(second["gpus"], list) and second["world_size"] == int(os.environ.get("WORLD_SIZE", "1"))


def test_a_missing_package_is_none_and_an_unreadable_file_starts_over(tmp_path):
    assert provenance.package_versions(("surely-not-a-package-xyz",)) == {"surely-not-a-package-xyz": None}
    with open(paths.provenance_file(str(tmp_path)), "w") as f:
        f.write("{half")
    provenance.record_start(str(tmp_path), ["x"])
    assert [r["command"][1:] for r in provenance.read(str(tmp_path))] == [["x"]]


def test_a_run_records_its_own_command_line(core_run):
    directory, _ = core_run
    starts = provenance.read(directory)
    assert len(starts) == 1
    command = starts[0]["command"]
    assert command[1].endswith("main_imp_fillback.py") and command[command.index("--save_dir") + 1] == directory


def test_a_torchrun_worker_records_how_it_was_launched(monkeypatch):
    for name, value in {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    assert provenance.torchrun_launch() == {"nproc_per_node": 2, "nnodes": 2, "rendezvous": "node1:29500"}
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert provenance.torchrun_launch() is None
