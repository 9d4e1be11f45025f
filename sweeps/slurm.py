"""`--executor slurm` (one Slurm job array) and `--executor submitit_local` (submitit's LocalExecutor), both
through submitit (the `sweeps` extra: pip install 'submitit>=1.5').

Each cell to run becomes one `sweeps.job.CellJob` of one array (`executor.batch()`); preemption and the
time limit requeue it and the requeued job resumes from the runner's checkpoint (see sweeps/job.py). The
job ids and their cells are appended to `<sweep>/jobs.json`; submitit's own logs and pickles go to
`--slurm_log_dir` (default `<sweep>/slurm`), the runner's output to `<sweep>/logs/<cell>.log`.
Without `--wait` the sweep returns once the jobs are submitted; with it, it waits and reports as the
local pool does. Jobs run in the directory sweep.py was started from, with this checkout on PYTHONPATH.
"""
import getpass
import importlib.util
import os
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from typing import Dict, List

from sweeps import record
from sweeps.executors import EXECUTORS, REPO, runner_argv
from sweeps.plan import Cell, Sweep
from utils import paths
from utils.errors import UsageError

STOP_MARGIN_S = 15  # checkpoint() must let the runner save well before the job is killed


class SubmititExecutor(ABC):
    forward_sigterm = False
    cluster = ""

    @classmethod
    def add_arguments(cls, parser) -> None:
        if any(action.dest == "slurm_partition" for action in parser._actions):
            return  # the two submitit executors share their flags
        g = parser.add_argument_group("slurm / submitit_local executors")
        g.add_argument("--slurm_partition", default=None)
        g.add_argument("--slurm_account", default=None)
        g.add_argument("--slurm_qos", default=None)
        g.add_argument("--timeout_min", type=int, default=1440, help="time limit of one job (minutes); a job that "
                       "reaches it is requeued and resumes (at most --max_num_timeout times)")
        g.add_argument("--gpus_per_node", type=int, default=1, help="GPUs per job (one cell a job)")
        g.add_argument("--cpus_per_task", type=int, default=8)
        g.add_argument("--mem_gb", type=float, default=None)
        g.add_argument("--slurm_array_parallelism", type=int, default=None, help="jobs of the array running at once")
        g.add_argument("--slurm_log_dir", default=None, help="submitit's logs and pickles (default <sweep>/slurm)")
        g.add_argument("--signal_delay_s", type=int, default=90, help="the preemption signal comes this long "
                       "before the time limit; the runner gets SIGTERM then and saves")
        g.add_argument("--max_num_timeout", type=int, default=3, help="requeues after a time-out (preemptions "
                       "are not counted)")
        g.add_argument("--wait", action="store_true", help="wait for the jobs and report as the local pool does")

    def __init__(self, options):
        if importlib.util.find_spec("submitit") is None:
            raise UsageError(f"--executor {self.name}: needs submitit (pip install 'submitit>=1.5')")
        for flag in ("timeout_min", "gpus_per_node", "cpus_per_task", "signal_delay_s", "slurm_array_parallelism"):
            value = getattr(options, flag)
            if value is not None and value < (0 if flag == "gpus_per_node" else 1):
                raise UsageError(f"--{flag} {value}: must be at least {0 if flag == 'gpus_per_node' else 1}")
        if options.max_num_timeout < 0 or (options.mem_gb is not None and options.mem_gb <= 0):
            raise UsageError("--max_num_timeout must be >= 0 and --mem_gb positive")
        if options.signal_delay_s >= options.timeout_min * 60:
            raise UsageError(f"--signal_delay_s {options.signal_delay_s}: must be shorter than --timeout_min "
                             f"{options.timeout_min} (minutes)")
        self.options, self.waits = options, options.wait

    @abstractmethod
    def make_executor(self, folder: str):
        """The submitit executor that writes its logs and pickles under `folder`."""

    def job_folder(self, log_dir: str) -> str:
        """submitit's folder template: one subfolder per job (`%j` is the job id)."""
        return os.path.join(log_dir, "%j")

    def queued(self, folder: str) -> Dict[str, str]:
        """{cell: job id} of the cells whose latest job (jobs.json) is still queued or running: not resubmitted."""
        return {}

    def launch(self, sweep: Sweep, todo: List[Cell], states: Dict[str, str]) -> Dict[str, object]:
        from sweeps.job import CellJob
        import submitit
        options = self.options
        log_dir = options.slurm_log_dir or os.path.join(sweep.folder, "slurm")
        queued = self.queued(sweep.folder)
        results: Dict[str, object] = {c.name: f"queued (job {queued[c.name]})" for c in todo if c.name in queued}
        for cell in todo:
            if cell.name in queued:
                print(f"skip {cell.name}: job {queued[cell.name]} is still queued or running", flush=True)
        todo = [cell for cell in todo if cell.name not in queued]
        if not todo:
            return results
        # the job process unpickles sweeps.job.CellJob: this checkout must be importable wherever it starts
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        executor = self.make_executor(self.job_folder(log_dir))
        cwd, wait_s = os.getcwd(), max(5, options.signal_delay_s - STOP_MARGIN_S)
        jobs = []
        with executor.batch():
            for cell in todo:
                log = os.path.abspath(sweep.log_file(cell))
                jobs.append(executor.submit(CellJob(cell.name, runner_argv(cell), cwd, log, self.forward_sigterm,
                                                    wait_s)))
        record.add_jobs(sweep.folder, self.name, log_dir, [{"cell": c.name, "job_id": j.job_id}
                                                          for c, j in zip(todo, jobs)])
        for cell, job in zip(todo, jobs):
            print(f"submitted {cell.name} ({states[cell.name]}): job {job.job_id}, log {sweep.log_file(cell)}",
                  flush=True)
        if not self.waits:
            return dict(results, **{cell.name: f"job {job.job_id}" for cell, job in zip(todo, jobs)})
        for cell, job in zip(todo, jobs):
            try:
                job.result()
                results[cell.name] = 0
            except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
                lines = str(exc).strip().splitlines()
                reason = next((line for line in lines if "RunnerFailed: " in line), lines[0] if lines else "")
                print(f"job {job.job_id} ({cell.name}) failed: {reason.strip()}", file=sys.stderr, flush=True)
                results[cell.name] = f"failed (job {job.job_id})"
        return results


@EXECUTORS.register("slurm")
class SlurmArray(SubmititExecutor):
    name = "slurm"

    def __init__(self, options):
        super().__init__(options)
        if shutil.which("srun") is None or shutil.which("sbatch") is None:
            raise UsageError("--executor slurm: srun/sbatch not found, this is not a Slurm machine "
                             "(use --executor submitit_local or local)")

    def queued(self, folder: str) -> Dict[str, str]:
        latest = record.latest_jobs(folder)
        if not latest:
            return {}
        listed = subprocess.run(["squeue", "--array", "--noheader", "--format=%i", "--user", getpass.getuser()],
                                capture_output=True, text=True)
        if listed.returncode != 0:
            raise UsageError(f"squeue failed ({listed.stderr.strip()}); cannot tell which cells of "
                             f"{paths.jobs_file(folder)} are still queued")
        in_queue = set(listed.stdout.split())
        return {cell: job for cell, job in latest.items() if job in in_queue}

    def make_executor(self, folder: str):
        import submitit
        o = self.options
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=o.max_num_timeout)
        extra = {k: v for k, v in (("slurm_partition", o.slurm_partition), ("slurm_account", o.slurm_account),
                                   ("slurm_qos", o.slurm_qos), ("mem_gb", o.mem_gb),
                                   ("slurm_array_parallelism", o.slurm_array_parallelism)) if v is not None}
        executor.update_parameters(name="sweep", timeout_min=o.timeout_min, gpus_per_node=o.gpus_per_node,
                                   cpus_per_task=o.cpus_per_task, tasks_per_node=1, nodes=1,
                                   slurm_signal_delay_s=o.signal_delay_s, **extra)
        return executor


@EXECUTORS.register("submitit_local")
class SubmititLocal(SubmititExecutor):
    """submitit's LocalExecutor: every job starts at once on this machine (no array parallelism limit);
    its controller signals only the job process, so the job forwards SIGTERM to the runner."""
    name = "submitit_local"
    forward_sigterm = True

    def job_folder(self, log_dir: str) -> str:
        """`log_dir` itself: submitit's local controller creates its folder unformatted (submitit 1.5,
        local/local.py Controller.start_tasks), so a `%j` template would leave an empty folder named `%j`;
        the job files are told apart by their `<pid>_` prefix instead."""
        return log_dir

    def make_executor(self, folder: str):
        import submitit
        o = self.options
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=o.max_num_timeout)
        executor.update_parameters(timeout_min=o.timeout_min, gpus_per_node=o.gpus_per_node,
                                   signal_delay_s=o.signal_delay_s)
        return executor
