"""One run per run dir: `<run_dir>/.lock`, held for the whole run.

    with RunLock(directory):
        ...  # nobody else writes checkpoints here meanwhile

The primary mechanism is `fcntl.flock` on the open lock file: the kernel drops
it when the holder dies, even by SIGKILL, so a dead run never blocks the next
one and a recycled pid cannot fake a live holder. The file itself holds JSON
{pid, host, started, command} for the message a refused run prints, and is
created with O_CREAT|O_EXCL so two starters cannot both think they made it.

NFS caveat: flock is reliable on local disks; on NFS it is emulated with
byte-range locks (Linux >= 2.6.12) and only works across machines when the
mount has working lock support (not `nolock`, not `local_lock=flock|all`).
So a lock written by *another host* is never assumed stale, whatever its age:
this host can neither see that process nor trust that flock reached it. The
user is told to check that run and delete the file by hand.
"""
import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Optional, Sequence

from utils import paths
from utils.errors import UsageError

_ATTEMPTS = 5  # a holder releasing while we open its file makes us retry on the new file


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def read_holder(path: str) -> Optional[dict]:
    """The JSON a lock file holds, or None when it is missing, empty or garbled."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "an unknown process (the lock file is empty or unreadable)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} "
            f"(started {holder.get('started')}: {holder.get('command') or '?'})")


class RunLock:
    def __init__(self, directory: str, command: Optional[Sequence[str]] = None, warn=None):
        self.directory = directory
        self.path = paths.lock_file(directory)
        self.command = " ".join(command if command is not None else sys.argv)
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
        self.fd: Optional[int] = None
        self.created_directory = False

    # ---- acquire ------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        if self.fd is not None:
            raise RuntimeError(f"{self.path}: this RunLock is already held")
        if not os.path.isdir(self.directory):
            try:
                os.makedirs(self.directory)
                self.created_directory = True
            except FileExistsError:
                pass  # another starter made it a moment ago: the lock below decides
            except OSError as exc:
                raise UsageError(f"--save_dir {self.directory}: cannot create the run dir "
                                 f"({exc.strerror or exc})") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise UsageError(f"--save_dir {self.directory}: the run dir is not writable")
        for _ in range(_ATTEMPTS):
            fd, created = self._open()
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._forget_directory()
                raise UsageError(self._refusal(read_holder(self.path))) from None
            if not self._still_linked(fd):
                os.close(fd)  # the holder removed the file between our open and flock
                continue
            try:
                if not created:
                    self._check_previous(read_holder(self.path))
                self._write_record(fd)
            except BaseException:
                os.close(fd)
                self._forget_directory()
                raise
            self.fd = fd
            return self
        self._forget_directory()
        raise UsageError(f"{self.directory}: could not take {self.path} (it kept changing); is another run "
                         f"starting in this run dir?")

    def _open(self):
        """(fd, created), or (None, False) when the file vanished between our two attempts."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        except OSError as exc:
            self._forget_directory()
            raise UsageError(f"--save_dir {self.directory}: cannot create the lock file {self.path} "
                             f"({exc.strerror or exc})") from None
        try:
            return os.open(self.path, os.O_RDWR), False
        except FileNotFoundError:
            return None, False
        except OSError as exc:
            self._forget_directory()
            raise UsageError(f"--save_dir {self.directory}: cannot open the lock file {self.path} "
                             f"({exc.strerror or exc})") from None

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _check_previous(self, holder: Optional[dict]) -> None:
        """We hold the flock, so on this host the previous holder is gone; a foreign host is another story."""
        here = socket.gethostname()
        if holder and holder.get("host") not in (None, here):
            raise UsageError(
                f"{self.directory} is locked by {describe(holder)}; a lock from another host is never assumed "
                f"stale, whatever its age, as this host cannot check that process: if that run is dead, "
                f"delete {self.path} and start again")
        pid = holder.get("pid") if holder else None
        state = "is no longer running" if isinstance(pid, int) and not pid_alive(pid) else \
            "does not hold the lock (pid reused, or a crash before the lock was taken)"
        self.warn(f"taking over the stale lock {self.path}: {describe(holder)} {state}")

    def _write_record(self, fd: int) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": self.command}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _refusal(self, holder: Optional[dict]) -> str:
        return (f"{self.directory} is in use by another run: {describe(holder)} holds {self.path}; wait for it "
                f"to finish or stop it (a killed run frees the lock by itself), or choose another "
                f"--exp_name / --save_dir")

    def _forget_directory(self) -> None:
        """A refused start leaves no trace: remove the run dir if we made it and it is still empty."""
        if self.created_directory:
            try:
                os.rmdir(self.directory)
            except OSError:
                pass
            self.created_directory = False

    # ---- release ------------------------------------------------------------------------
    def release(self) -> None:
        """Remove the lock file if it is still ours, then drop the flock."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            holder = read_holder(self.path)
            if self._still_linked(fd) and holder and holder.get("pid") == os.getpid():
                try:
                    os.unlink(self.path)  # while still flocked, so a waiting starter re-checks the inode
                except OSError as exc:  # the run dir turned read-only: the flock still goes with our fd
                    self.warn(f"could not remove {self.path} ({exc.strerror or exc}); the next run takes it over")
        finally:
            os.close(fd)
        if self.created_directory and os.path.isdir(self.directory) and not os.listdir(self.directory):
            self._forget_directory()  # the run failed before writing anything

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
