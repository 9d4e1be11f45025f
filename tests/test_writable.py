"""utils.writable.check_writable: the one-line errors an output flag gets before any work starts."""
import os

import pytest

from utils.writable import PathError, check_writable


def test_a_file_in_an_existing_folder_passes(tmp_path):
    check_writable(str(tmp_path / "out.json"), "--out")  # no error
    assert not os.path.exists(tmp_path / "out.json")  # nothing written


def test_errors_name_the_flag_and_the_path(tmp_path):
    with pytest.raises(PathError, match=r"^--out: empty path$"):
        check_writable("", "--out")
    with pytest.raises(PathError, match=rf"^--out {tmp_path}: is a folder, expected a file path$"):
        check_writable(str(tmp_path), "--out")
    missing = tmp_path / "a" / "b" / "out.json"
    with pytest.raises(PathError, match=rf"^--output {missing}: folder {tmp_path / 'a' / 'b'} does not exist$"):
        check_writable(str(missing), "--output")


def test_create_folders_checks_the_nearest_existing_ancestor(tmp_path):
    check_writable(str(tmp_path / "a" / "b" / "out.json"), "--out", create_folders=True)
    assert not os.path.exists(tmp_path / "a")  # checked, not created
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PathError, match=rf"{blocker} is a file, not a folder$"):
        check_writable(str(blocker / "sub" / "out.json"), "--out", create_folders=True)


def test_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # root may write anywhere: the folder's permission answer is stood in for
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(PathError, match=rf"folder {locked} is not writable$"):
        check_writable(str(locked / "out.json"), "--out")
    check_writable(str(tmp_path / "out.json"), "--out")  # its parent stays writable
