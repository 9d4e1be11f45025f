"""Graceful stops: SIGTERM (Slurm preemption) and Ctrl-C stop at the next training step, save, exit.

The handler only records the request (no I/O: a handler that wrote to the run log
while the interrupted main thread was itself writing to it raised "reentrant call");
the message is logged when the loop first sees the request. The loop checks it after every
step (a host flag, no device sync), writes a mid-epoch checkpoint (loader
position, running sums, RNG) and raises `Interrupted`, so a preempted run is
saved within seconds whatever the epoch length. A request during validation or
a round's end takes effect when that finishes. A second signal while waiting
falls through to the default behaviour (immediate exit).
"""
import signal
import threading
from abc import ABC, abstractmethod
from typing import Optional


class Interrupted(Exception):
    def __init__(self, signum: int, checkpoint: Optional[str]):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalHandlers(ABC):
    """Context manager base: `self._handle(signum, frame)` handles SIGTERM and SIGINT inside the `with`
    (installed from the main thread only, where Python delivers signals); the previous handlers come back
    on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._previous = {}

    @abstractmethod
    def _handle(self, signum, frame) -> None:
        """Called in the main thread when a signal arrives: record it, nothing more (no I/O)."""

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class StopRequest(SignalHandlers):
    """Context manager that turns SIGTERM/SIGINT into a request checked after every training step."""

    def __init__(self, log=print):
        super().__init__()
        self.signum: Optional[int] = None
        self.log = log
        self._announced = False

    @property
    def requested(self) -> bool:
        """True once a signal arrived; the first call that sees it logs the request (outside the handler)."""
        if self.signum is None:
            return False
        if not self._announced:
            self._announced = True
            self.log(f"{signal.Signals(self.signum).name} received: stopping after this training step, saving a "
                     f"checkpoint (send it again to stop at once)")
        return True

    def at_step_boundary(self) -> bool:
        """`requested`, asked after every training step (training/distributed.py agrees on it across ranks)."""
        return self.requested

    def _handle(self, signum, _frame):
        if self.signum is not None:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signum = signum
