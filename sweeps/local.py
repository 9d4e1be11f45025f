"""`--executor local`: the cells as runner subprocesses on this machine, N at a time.

With several GPUs visible (CUDA_VISIBLE_DEVICES, else torch.cuda.device_count()) every running cell gets
one of them (CUDA_VISIBLE_DEVICES=<id> for the child, slot i -> GPU i mod count) and N defaults to the GPU
count; on the CPU N defaults to 1 and N > 1 cells share the cores (OMP_NUM_THREADS = cores / N unless set).
A failing cell does not stop the others. Ctrl-C / SIGTERM: no new cell starts, SIGTERM goes to every
running runner (each saves a mid-epoch checkpoint and exits; `--resume` continues it bit for bit) and
the pool waits for them; a second Ctrl-C / SIGTERM is forwarded again, which stops the runners at once.
Children run in their own session, so a terminal's Ctrl-C reaches them once, through the pool.
"""
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from sweeps.executors import EXECUTORS, child_env, open_log, runner_argv
from sweeps.plan import Cell, Sweep
from utils.errors import UsageError
from utils.interrupts import SignalHandlers

POLL_S = 0.2


def visible_gpus() -> List[str]:
    """The GPU ids a child may be given: CUDA_VISIBLE_DEVICES's entries when set, else 0..device_count-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and not d.strip().startswith("-")]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


class SignalRelay(SignalHandlers):
    """SIGINT/SIGTERM handlers that only count signals; `forward` sends one SIGTERM per new signal to children."""

    def __init__(self):
        super().__init__()
        self.count, self._forwarded = 0, 0

    def _handle(self, signum, _frame):
        self.count += 1

    def forward(self, processes: List[subprocess.Popen]) -> None:
        while self._forwarded < self.count:
            self._forwarded += 1
            print(f"sweep: stop requested ({self._forwarded}): SIGTERM to {len(processes)} running cell(s)"
                  + ("; they save a checkpoint and stop (again to stop them at once)" if self._forwarded == 1
                     else ""), file=sys.stderr, flush=True)
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)


@EXECUTORS.register("local")
class LocalPool:
    waits = True

    @classmethod
    def add_arguments(cls, parser) -> None:
        group = parser.add_argument_group("local executor")
        group.add_argument("--parallel", type=int, default=None,
                           help="cells run at once (default: one per visible GPU when there are several, else 1)")

    def __init__(self, options):
        if options.parallel is not None and options.parallel < 1:
            raise UsageError(f"--parallel {options.parallel}: must be at least 1")
        self.gpus = visible_gpus()
        self.parallel = options.parallel or (len(self.gpus) if len(self.gpus) > 1 else 1)

    def slot_env(self, slot: int) -> Dict[str, str]:
        if len(self.gpus) > 1:
            return {"CUDA_VISIBLE_DEVICES": self.gpus[slot % len(self.gpus)]}
        if self.parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            return {"OMP_NUM_THREADS": str(max(1, cores // self.parallel))}
        return {}

    def start(self, sweep: Sweep, cell: Cell, slot: int, state: str):
        return self.spawn(sweep, cell, slot, runner_argv(cell), "local", state)

    def spawn(self, sweep: Sweep, cell: Cell, slot: int, argv: List[str], kind: str, state: str,
              details: str = "", listing: str = "", env: Optional[Dict[str, str]] = None):
        """Start `argv` for `cell` in its own session on `slot`'s GPU, output to the cell's log (headed
        `<kind>, <state><where><details>`); prints `start <cell> (<state><where>): <listing>log <file>`.
        Returns (process, log file)."""
        extra = {**self.slot_env(slot), **(env or {})}
        where = f" on GPU {extra['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in extra else ""
        log = open_log(sweep, cell, f"{kind}, {state}{where}{details}")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=child_env(extra), start_new_session=True)
        print(f"start {cell.name} ({state}{where}): {listing}log {sweep.log_file(cell)}", flush=True)
        return process, log

    def launch(self, sweep: Sweep, todo: List[Cell], states: Dict[str, str]) -> Dict[str, Optional[int]]:
        results: Dict[str, Optional[int]] = {cell.name: None for cell in todo}
        pending, running = list(todo), {}  # slot -> (cell, process, log)
        with SignalRelay() as relay:
            while pending or running:
                for slot in range(self.parallel):
                    if slot not in running and pending and not relay.count:
                        cell = pending.pop(0)
                        running[slot] = (cell, *self.start(sweep, cell, slot, states[cell.name]))
                relay.forward([process for _, process, _ in running.values()])
                time.sleep(POLL_S)
                for slot, (cell, process, log) in list(running.items()):
                    code = process.poll()
                    if code is not None:
                        log.close()
                        del running[slot]
                        results[cell.name] = code
                        print(f"end {cell.name}: exit code {code}", flush=True)
                if relay.count and pending:
                    print(f"sweep: {len(pending)} cell(s) not started", file=sys.stderr, flush=True)
                    pending = []
        return results
