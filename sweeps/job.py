"""One cell as a submitit job: a Checkpointable callable that runs the runner as a child process.

Requeue protocol (submitit, https://github.com/facebookincubator/submitit, docs/checkpointing.md):
submitit calls `checkpoint()` when the job gets its preemption / time-limit signal (USR2 by default:
`#SBATCH --signal=USR2@<signal_delay_s>`, or the local executor's timeout), pickles what it returns and
requeues the job. Here `checkpoint()` sends the runner SIGTERM, waits for it to save its mid-epoch
checkpoint and exit, and returns a fresh copy of the job: the requeued job runs the same command, whose
`--resume` continues from that checkpoint.

Signals reach the runner exactly once (a second SIGTERM would make it stop at once, unsaved):
- the child ignores submitit's USR2 (it would kill an unprepared Python process);
- SIGTERM to the job process: under Slurm every process of the job step, the runner included, gets it
  from slurmstepd (preemption, scancel, the time limit), so it is not forwarded, only noted; under
  submitit's local executor only the job process gets it, so it is forwarded;
- `checkpoint()` sends SIGTERM unless the runner already got one.
"""
import os
import signal
import subprocess
import threading
import time
from typing import List, Optional

import submitit

from sweeps.executors import child_env, write_log_header

POLL_S = 0.2


def _usr_signal() -> int:
    """submitit's preemption signal (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def _ignore_preemption_signal() -> None:  # runs in the child between fork and exec: an ignored signal stays so
    signal.signal(_usr_signal(), signal.SIG_IGN)


class RunnerFailed(RuntimeError):
    """The runner exited with a code other than 0; the message names the cell, the code and its log."""


class CellJob(submitit.helpers.Checkpointable):
    """Runs `argv` (the runner command of cell `name`) in `cwd`, output appended to `log`.

    `forward_sigterm`: forward a SIGTERM the job process gets (True under submitit's local executor, False
    under Slurm, see the module doc). `stop_wait_s`: how long `checkpoint()` waits for the runner to save
    (keep it under the signal delay). Returns {"cell", "exit_code": 0}; raises RunnerFailed otherwise.
    Only the constructor arguments (plain data) are pickled: on submission and in every checkpoint.
    """

    def __init__(self, name: str, argv: List[str], cwd: str, log: str, forward_sigterm: bool,
                 stop_wait_s: float):
        self.spec = dict(name=name, argv=list(argv), cwd=cwd, log=log, forward_sigterm=forward_sigterm,
                         stop_wait_s=stop_wait_s)
        self._process: Optional[subprocess.Popen] = None
        self._signalled = False

    def __getstate__(self):
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.__init__(**state["spec"])

    def __call__(self) -> dict:
        spec = self.spec
        os.makedirs(os.path.dirname(spec["log"]), exist_ok=True)
        with open(spec["log"], "ab") as log:
            write_log_header(log, f"submitit job {_job_id()}: {' '.join(spec['argv'])}")
            signal.signal(signal.SIGTERM, self._on_sigterm)  # replaces submitit's "bypass" handler
            self._process = subprocess.Popen(spec["argv"], cwd=spec["cwd"], stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=child_env({}),
                                             preexec_fn=_ignore_preemption_signal)
            # a thread reaps the child, so a signal handler in this (main) thread never waits on a lock
            threading.Thread(target=self._process.wait, daemon=True).start()
            while self._process.returncode is None:
                time.sleep(POLL_S)
        code = self._process.returncode
        if code != 0:
            raise RunnerFailed(f"cell {spec['name']}: the runner exited with code {code}; see {spec['log']}")
        return {"cell": spec["name"], "exit_code": 0}

    def _on_sigterm(self, signum, _frame) -> None:
        if self.spec["forward_sigterm"]:
            self._stop_runner()
        else:
            self._signalled = True  # Slurm signalled the whole step, the runner included

    def _stop_runner(self) -> None:
        if self._process is not None and self._process.returncode is None and not self._signalled:
            self._signalled = True
            self._process.send_signal(signal.SIGTERM)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Stop the runner (it saves a checkpoint) and resubmit this cell: the requeued job resumes it."""
        if self._process is not None:
            self._stop_runner()
            deadline = time.time() + self.spec["stop_wait_s"]
            while self._process.returncode is None and time.time() < deadline:
                time.sleep(POLL_S)
        return submitit.helpers.DelayedSubmission(CellJob(**self.spec), *args, **kwargs)


def _job_id() -> str:
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:  # called outside a job (tests)
        return "-"
