"""The run-dir lock: one holder at a time, dead holders' locks taken over, foreign hosts never guessed."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT
from utils import paths
from utils.errors import UsageError
from utils.lock import RunLock

# A child that takes the lock, says so, and holds it until killed.
HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from utils.lock import RunLock
    lock = RunLock(sys.argv[1], command=["holder"]).acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
""")


def start_holder(directory, seconds=60.0):
    child = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT), str(directory), str(seconds)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has this pid now (reuse within the test is negligible)


def test_lock_file_holds_pid_host_and_command_and_goes_away(tmp_path):
    with RunLock(str(tmp_path), command=["main_imp_fillback.py", "--resume"]):
        record = json.load(open(paths.lock_file(str(tmp_path))))
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == "main_imp_fillback.py --resume" and record["started"]
    assert not os.path.exists(paths.lock_file(str(tmp_path)))


def test_second_holder_in_another_process_is_refused_then_a_killed_holder_is_taken_over(tmp_path):
    child = start_holder(tmp_path)
    try:
        with pytest.raises(UsageError) as info:
            RunLock(str(tmp_path)).acquire()
        message = str(info.value)
        assert len(message.splitlines()) == 1
        assert str(tmp_path) in message and f"pid {child.pid}" in message and socket.gethostname() in message
        assert "--save_dir" in message  # says how to proceed
        assert json.load(open(paths.lock_file(str(tmp_path))))["pid"] == child.pid  # untouched
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # SIGKILL ran no cleanup: the file is still there, naming the dead child
    assert json.load(open(paths.lock_file(str(tmp_path))))["pid"] == child.pid
    warnings = []
    with RunLock(str(tmp_path), warn=warnings.append):
        assert json.load(open(paths.lock_file(str(tmp_path))))["pid"] == os.getpid()
    assert len(warnings) == 1 and "stale" in warnings[0] and f"pid {child.pid}" in warnings[0]
    assert "no longer running" in warnings[0]


def test_second_holder_in_the_same_process_is_refused(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
        assert os.path.exists(paths.lock_file(str(tmp_path)))  # the refused attempt removed nothing


def test_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    pid = dead_pid()
    stale = {"pid": pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00", "command": "old"}
    with open(paths.lock_file(str(tmp_path)), "w") as f:
        json.dump(stale, f)
    warnings = []
    with RunLock(str(tmp_path), warn=warnings.append):
        assert json.load(open(paths.lock_file(str(tmp_path))))["pid"] == os.getpid()
    assert len(warnings) == 1 and f"pid {pid}" in warnings[0] and "no longer running" in warnings[0]


def test_lock_of_another_host_is_never_assumed_stale(tmp_path):
    foreign = {"pid": 12345, "host": "some-other-node", "started": "2001-01-01T00:00:00", "command": "x"}
    path = paths.lock_file(str(tmp_path))
    with open(path, "w") as f:
        json.dump(foreign, f)
    with pytest.raises(UsageError) as info:
        RunLock(str(tmp_path)).acquire()
    message = str(info.value)
    assert "some-other-node" in message and "pid 12345" in message and "never assumed stale" in message
    assert path in message  # tells which file to delete
    assert json.load(open(path)) == foreign


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    path = paths.lock_file(str(tmp_path))
    lock = RunLock(str(tmp_path)).acquire()
    os.unlink(path)  # someone removed our lock by hand and another run took the dir
    with open(path, "w") as f:
        json.dump({"pid": 1, "host": socket.gethostname()}, f)
    lock.release()
    assert json.load(open(path))["pid"] == 1


def test_a_run_dir_the_lock_created_is_removed_only_if_nothing_was_written(tmp_path):
    empty, used = str(tmp_path / "empty"), str(tmp_path / "used")
    with RunLock(empty):
        assert os.path.isdir(empty)
    assert not os.path.exists(empty)  # a start refused later (bad checkpoint) leaves no run dir
    with RunLock(used):
        open(os.path.join(used, "config.json"), "w").close()
    assert os.listdir(used) == ["config.json"]


def test_unusable_run_dir_is_a_usage_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match="--save_dir .*a_file"):
        RunLock(str(blocker / "run")).acquire()


RACER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from utils.errors import UsageError
    from utils.lock import RunLock
    while time.time() < float(sys.argv[2]):
        pass  # start together
    try:
        lock = RunLock(sys.argv[1], warn=lambda m: None).acquire()
    except UsageError:
        print("refused")
    else:
        time.sleep(1.0)
        print("won")
        lock.release()
""")


def test_racing_starters_on_a_fresh_dir_let_exactly_one_win(tmp_path):
    directory, start = str(tmp_path / "run"), time.time() + 1.0
    racers = [subprocess.Popen([sys.executable, "-c", RACER.format(root=ROOT), directory, str(start)],
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
    assert outcomes == ["refused", "refused", "refused", "won"]


def test_a_second_run_on_a_locked_run_dir_is_refused_before_writing(tmp_path, capsys):
    import torch
    from utils.cli import main
    directory = tmp_path / "run"
    child = start_holder(directory)  # stands in for a first run that is still going
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["--dataset", "synthetic", "--arch", "test_vit", "--struct", "none", "--no_wandb",
                     "--no_progress", "--pruning_times", "1", "--epochs", "1", "--val_size", "2500",
                     "--save_dir", str(directory)])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {child.pid}" in err and str(directory) in err, err
        assert os.listdir(directory) == [".lock"]  # not one byte of the second run landed
    finally:
        torch.set_num_threads(threads)
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_read_only_run_dir_with_a_stale_lock_is_a_one_line_usage_error(tmp_path, monkeypatch, capsys):
    """A read-only run dir holding a dead run's .lock: exit 2 naming the dir, nothing changed (as root the
    kernel would allow the writes, so the permission check is made to answer as for a normal user)."""
    from utils.cli import main
    directory = tmp_path / "run"
    directory.mkdir()
    lock = paths.lock_file(str(directory))
    record = json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "x", "command": "old"})
    with open(lock, "w") as f:
        f.write(record)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.fspath(path) == str(directory)
                        else real_access(path, mode, **kw))
    code = main(["--dataset", "synthetic", "--arch", "test_vit", "--no_wandb", "--save_dir", str(directory)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: --save_dir {directory}: the run dir is not writable", err
    assert os.listdir(directory) == [".lock"] and open(lock).read() == record


def test_a_lock_file_that_cannot_be_removed_is_left_with_a_warning(tmp_path, monkeypatch):
    warnings = []
    lock = RunLock(str(tmp_path), command=["x"], warn=warnings.append).acquire()
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path) == lock.path:
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", unlink)
    lock.release()  # no exception: the run's result must not turn into exit 1 here
    assert len(warnings) == 1 and "could not remove" in warnings[0] and "Permission denied" in warnings[0]
    monkeypatch.undo()
    RunLock(str(tmp_path), command=["y"], warn=warnings.append).acquire().release()  # the next run takes it over
