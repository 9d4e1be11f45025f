"""utils.jsonfile.read_json: one line naming the file per failure, and the callers' policies on top of it."""
import json
import os

import pytest

from compact.files import load_compact
from reports.runs import read_json_or_warn, read_run
from sweeps.record import read_existing
from utils import paths
from utils.errors import CheckpointError, UsageError
from utils.jsonfile import read_json


def write(path, text: str, mode: str = "w") -> str:
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def test_an_object_is_returned_as_is(tmp_path):
    path = write(tmp_path / "a.json", '{"rounds": [1, 2], "name": "x"}')
    assert read_json(path, "lineage file") == {"rounds": [1, 2], "name": "x"}


@pytest.mark.parametrize("content, line", [
    ("{not json", "unreadable lineage file (JSONDecodeError: Expecting property name enclosed in double quotes: "
                  "line 1 column 2 (char 1))"),
    ("", "unreadable lineage file (JSONDecodeError: Expecting value: line 1 column 1 (char 0))"),
    ("[1, 2]", "not a lineage file (a JSON array, not an object)"),
    ('"text"', "not a lineage file (a JSON string, not an object)"),
    ("3.5", "not a lineage file (a JSON number, not an object)"),
    ("null", "not a lineage file (a JSON null, not an object)"),
])
def test_bad_content_is_one_checkpoint_error_line_naming_the_file(tmp_path, content, line):
    path = write(tmp_path / "lineage.json", content)
    with pytest.raises(CheckpointError) as info:
        read_json(path, "lineage file")
    assert str(info.value) == f"{path}: {line}"


def test_missing_folder_and_bad_utf8_are_named(tmp_path):
    missing = str(tmp_path / "none.json")
    with pytest.raises(CheckpointError) as info:
        read_json(missing, "lineage file")
    assert str(info.value) == f"{missing}: no such file (expected a lineage file)"
    with pytest.raises(UsageError) as info:
        read_json(str(tmp_path), "sweep record", UsageError)
    assert str(info.value).startswith(f"{tmp_path}: unreadable sweep record (IsADirectoryError: [Errno 21] ")
    binary = write(tmp_path / "bin.json", b"\xff\xfe{}", "wb")
    with pytest.raises(ValueError) as info:
        read_json(binary, "feature-cache index", ValueError)
    assert type(info.value) is ValueError
    assert str(info.value).startswith(f"{binary}: unreadable feature-cache index (UnicodeDecodeError: 'utf-8' codec")
    assert "\n" not in str(info.value)


def test_sweeps_refuse_with_the_line_and_a_way_out(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    assert read_existing(str(folder)) is None  # no sweep.json yet: a new sweep
    path = write(paths.sweep_file(str(folder)), "[]")
    with pytest.raises(UsageError) as info:
        read_existing(str(folder))
    assert str(info.value) == (f"{path}: not a sweep record (a JSON array, not an object); move it away or use "
                               f"another --name")


def test_compact_refuses_missing_bad_and_foreign_arch_files(tmp_path):
    arch = os.path.join(tmp_path, "arch.json")
    with pytest.raises(UsageError, match=r"arch.json: no such file \(expected a compact arch file\)$"):
        load_compact(str(tmp_path))
    write(arch, "{")
    with pytest.raises(UsageError, match=r"arch.json: unreadable compact arch file \(JSONDecodeError: "):
        load_compact(str(tmp_path))
    write(arch, json.dumps({"format": "other"}))
    with pytest.raises(UsageError, match=r"arch.json: not a compact arch file \(format is not 'imp-runner-compact/1'"):
        load_compact(str(tmp_path))


def test_reports_warn_and_skip(tmp_path):
    warnings = []
    assert read_json_or_warn(str(tmp_path / "absent.json"), "config file", warnings) == {} and warnings == []
    directory = str(tmp_path / "run")
    os.makedirs(directory)
    config = write(paths.config_file(directory), "[1]")
    lineage = write(paths.lineage_file(directory), '{"rounds": [')
    run = read_run(directory, warnings)
    assert run.rounds == [] and run.config == {}
    assert warnings == [f"{lineage}: unreadable lineage file (JSONDecodeError: Expecting value: line 1 column 13 "
                        f"(char 12)), ignored",
                        f"{config}: not a config file (a JSON array, not an object), ignored"]
