"""N processes timing the same training step at once on one device, over one shared window.

The parent (`run_group`) starts N copies of a benchmark in its worker mode; each worker, for every
config in turn: builds and warms up its step, waits at a file barrier until all N are ready, runs its
timed steps, waits at a second barrier (so no process builds the next config while others are timed),
and prints one JSON line {"config", "rank", "images", "start", "end"} or {"config", "rank", "error"}.
The aggregate of a config is all workers' images over the union of their windows (first start to last
end, time.time() seconds), which cannot overstate overlap; the sum of each worker's own rate is kept too.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Callable, Dict, List

BARRIER_TIMEOUT = 300.0  # seconds a worker waits for its peers (a crashed peer ends the group)
ENV_DIR, ENV_RANK, ENV_WORLD = "BENCH_BARRIER_DIR", "BENCH_RANK", "BENCH_WORLD"
ABORT = "abort"  # written by the parent when a worker failed: the others leave their barriers at once


def barrier(directory: str, name: str, rank: int, world: int, timeout: float = BARRIER_TIMEOUT) -> None:
    """Mark `rank` as arrived at barrier `name` and return once all `world` ranks have.
    Raises TimeoutError after `timeout` seconds."""
    open(os.path.join(directory, f"{name}.{rank}"), "w").close()
    deadline = time.monotonic() + timeout
    while sum(1 for f in os.listdir(directory) if f.startswith(f"{name}.")) < world:
        if os.path.exists(os.path.join(directory, ABORT)):
            raise RuntimeError(f"barrier {name}: a peer process failed")
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: peers did not arrive within {timeout:.0f} s")
        time.sleep(0.0005)


def worker_config(index: int, build: Callable[[], Callable], warm: Callable, run_timed: Callable,
                  images: int, describe: Callable[[BaseException], str]) -> None:
    """One config of a worker (see the module docstring): `build()` -> run_step, `warm(run_step)`,
    `run_timed(run_step)` -> (start, end) seconds; `images` trained in the timed window."""
    directory, rank, world = os.environ[ENV_DIR], int(os.environ[ENV_RANK]), int(os.environ[ENV_WORLD])
    record, run_step = {"config": index, "rank": rank}, None
    try:
        run_step = build()
        warm(run_step)
    except Exception as exc:  # recorded; the worker still meets its peers at both barriers
        record["error"], run_step = describe(exc), None
    barrier(directory, f"ready{index}", rank, world)
    if run_step is not None:
        try:
            start, end = run_timed(run_step)
            record.update(images=images, start=start, end=end)
        except Exception as exc:
            record["error"] = describe(exc)
    del run_step
    barrier(directory, f"done{index}", rank, world)
    print(json.dumps(record), flush=True)


def aggregate(records: List[dict]) -> Dict[str, float]:
    """One config's worker records -> {img_s (union window), sum_img_s, start_spread_s} or {error}."""
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        return {"error": errors[0]}
    start, end = min(r["start"] for r in records), max(r["end"] for r in records)
    return {"img_s": sum(r["images"] for r in records) / (end - start),
            "sum_img_s": sum(r["images"] / (r["end"] - r["start"]) for r in records),
            "start_spread_s": max(r["start"] for r in records) - start}


def run_group(count: int, argv: List[str], configs: int, timeout: float) -> List[Dict[str, float]]:
    """Start `count` workers (`argv`, run from the repository root), wait (at most `timeout` s, then kill
    them), and return one aggregate per config index 0..configs-1 ({error} where any worker failed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    directory = tempfile.mkdtemp(prefix="bench_barrier_")
    processes = []
    try:
        for rank in range(count):
            env = dict(os.environ, **{ENV_DIR: directory, ENV_RANK: str(rank), ENV_WORLD: str(count)})
            with open(os.path.join(directory, f"out{rank}"), "w") as out, \
                    open(os.path.join(directory, f"err{rank}"), "w") as err:
                processes.append(subprocess.Popen(argv, cwd=root, env=env, stdout=out, stderr=err))
        wait_all(processes, directory, timeout)
        by_config = {index: [] for index in range(configs)}
        for rank, process in enumerate(processes):
            records = {r["config"]: r for r in read_records(os.path.join(directory, f"out{rank}"))}
            failure = f"worker {rank} exited with code {process.returncode}: {last_line(directory, rank)}"
            for index in range(configs):
                by_config[index].append(records.get(index, {"error": failure}))
        return [aggregate(by_config[index]) for index in range(configs)]
    finally:
        for process in processes:  # only on an error above: every worker has exited otherwise
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def wait_all(processes: List[subprocess.Popen], directory: str, timeout: float) -> None:
    """Wait for every worker; after a failed one, tell the rest to stop waiting at barriers; kill all
    that still run after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in processes]  # every one polled (any() would stop at the first running)
        if None not in codes:
            break
        if any(code not in (None, 0) for code in codes):
            open(os.path.join(directory, ABORT), "w").close()
        time.sleep(0.05)
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def read_records(path: str) -> List[dict]:
    records = []
    with open(path) as f:
        for line in f:
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "config" in record:
                    records.append(record)
    return records


def last_line(directory: str, rank: int) -> str:
    with open(os.path.join(directory, f"err{rank}")) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][:300] if lines else "(no stderr)"
