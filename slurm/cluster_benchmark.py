"""Do jobs on the local cluster use the CPUs SLURM gave them? A benchmark, not a test.

    python -m slurm.cluster_benchmark [--cells 2] [--methods iwm] [--epochs 6] [--out cluster_benchmark.json]

The same units (2 cells x pretraining + 2 tasks, small but not trivial) run three ways. The cells are
seeds 0, 1, ... of one method (IWM by default): units of equal length, so the node's cores can be
shared evenly. `--methods ijepa,iwm` makes one cell per method instead (units of unequal length,
which leave a core idle at the end).

    sequential  one after another in one process, 1 thread (`bench sweep ... launcher=local
                threads=1`), the process and its loader worker pinned to one core (`taskset`), as
                a 1-CPU job is
    processes   one after another as above, but each unit in its own `bench run` process, as each
                job of the cluster is one: every unit pays Python's start-up, the imports and its
                kernel building again
    cluster     as a sweep on the local cluster (`launcher=slurm_localhost`: 1 CPU per task), the
                node's cores shared by the jobs SLURM runs side by side

With N cores and well-behaved jobs the cluster's wall time is close to sequential / N; a job that
runs more threads than its allocation (or that is not bound to its cores) makes it several times
longer. Prints the wall times and the ratios cluster / (sequential / N) and cluster / (processes /
N): the first includes the per-job start-up, the second compares like with like. Needs the
cluster (`slurm/cluster.sh start`); the data is generated before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark.config import load_config
from benchmark.core.data import resolve_data
from benchmark.core.threads import usable_cpus
from slurm.jobs import PRETRAIN
from slurm.sweep import load_sweep, unit_job

# Small but not trivial: tens of seconds per unit on one core, so that a job's start-up (python,
# imports, SLURM's scheduling and dependency passes: a few seconds) does not dominate.
SETTINGS = [
    "data.num_train=2000",
    "data.num_val=500",
    "pretrain.checkpoint_every=0",
    "tasks.attentive.epochs=5",
]


def sweep_file(folder: Path, cells: int, methods: list[str], epochs: int) -> Path:
    """cells seeds of one method, or one cell per method when several are named."""
    seeds = list(range(cells)) if len(methods) == 1 else [0]
    path = folder / "cluster_benchmark.yaml"
    path.write_text(
        f"grid: {{method: [{', '.join(methods)}], seed: {seeds}}}\n"
        f"tasks: [linear, attentive]\n"
        f"overrides: [pretrain.epochs={epochs}, {', '.join(SETTINGS)}]\n"
    )
    return path


def bench(*args: str, env: dict, pin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [*(["taskset", "-c", pin] if pin else []), sys.executable, "-m", "benchmark.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc


def queued() -> list[str]:
    """Job ids in the queue; squeue is a small C program, cheap enough to poll on a busy node."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return out.split()


def job_seconds(since: str) -> list[float]:
    """Elapsed seconds of every job that started after `since` (sacct, ISO time)."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-S", since, "-o", "JobID,ElapsedRaw,State"], capture_output=True, text=True
    ).stdout
    return [float(line.split("|")[1]) for line in out.splitlines() if line.count("|") == 2 and line.split("|")[1]]


def timed_sweep(
    spec: Path, sweep_dir: Path, launcher: list[str], env: dict, pin: str | None = None, poll: float = 0.5
) -> float:
    start = time.perf_counter()
    bench("sweep", str(spec), *launcher, f"sweep_dir={sweep_dir}", env=env, pin=pin)
    if launcher[0] != "launcher=local":  # submitted: wait until the queue is empty again
        # Polled with squeue, not `bench status`: a Python process that imports the harness every
        # few seconds would take a core's worth of CPU from the jobs it waits for.
        while queued():
            time.sleep(poll)
    seconds = time.perf_counter() - start
    failed = " ".join(bench("status", str(sweep_dir), env=env).stdout.split())
    if " 0 failed" not in failed:
        raise SystemExit(f"a unit failed: see bench status {sweep_dir}")
    return seconds


def timed_processes(spec: Path, sweep_dir: Path, env: dict, pin: str) -> float:
    """The sweep's units one after another, each in its own `bench run` process with the overrides
    its job would run with, 1 thread, pinned to one core."""
    sweep = load_sweep(str(spec), ["launcher=local", "threads=1", f"sweep_dir={sweep_dir}"])
    units = [f"{cell.name}/{what}" for cell in sweep.cells for what in (PRETRAIN, *cell.tasks)]
    sweep_dir.mkdir(parents=True)
    start = time.perf_counter()
    for unit in units:
        bench("run", *unit_job(sweep, unit).run_overrides(), env=env, pin=pin)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2, choices=(1, 2, 3, 4), help="seeds of the one method")
    parser.add_argument(
        "--methods",
        default="iwm",
        help="one method (its seeds are the cells) or several, comma-separated (a cell each)",
    )
    parser.add_argument("--epochs", type=int, default=6, help="pretraining epochs per cell")
    parser.add_argument("--out", default="cluster_benchmark.json")
    args = parser.parse_args(argv)
    if shutil.which("sbatch") is None:
        raise SystemExit("no SLURM here: start the local cluster with slurm/cluster.sh start")
    methods = [m for m in args.methods.split(",") if m]
    cells = args.cells if len(methods) == 1 else len(methods)
    cores = usable_cpus()
    work = Path(tempfile.mkdtemp(prefix="cluster-benchmark-"))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    try:
        spec = sweep_file(work, cells, methods, args.epochs)
        data_cfg = load_config([s for s in SETTINGS if not s.startswith("tasks.")])
        resolve_data(data_cfg.data, data_cfg.cache_dir)  # generated once, untimed
        if queued():
            raise SystemExit("the local cluster's queue is not empty: the benchmark needs it to itself")
        one_core = str(min(os.sched_getaffinity(0)))
        sequential = timed_sweep(spec, work / "sequential", ["launcher=local", "threads=1"], env, pin=one_core)
        processes = timed_processes(spec, work / "processes", env, pin=one_core)
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        cluster = timed_sweep(spec, work / "cluster", ["launcher=slurm_localhost"], env)
        jobs = job_seconds(since)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = cluster / (sequential / cores)
    ratio_processes = cluster / (processes / cores)
    result = {
        "cells": cells,
        "methods": methods,
        "pretrain_epochs": args.epochs,
        "units": cells * 3,
        "cores": cores,
        "sequential_seconds": sequential,
        "processes_seconds": processes,
        "cluster_seconds": cluster,
        "ratio_to_ideal": ratio,
        "ratio_to_processes": ratio_processes,
        "cluster_job_seconds": jobs,
    }
    print(
        f"{cells * 3} units ({cells} cells of {'/'.join(methods)}): sequential (1 thread each) {sequential:.1f} s; "
        f"local cluster (1 CPU per job, {cores} cores) {cluster:.1f} s; "
        f"cluster / (sequential / {cores}) = {ratio:.2f}"
    )
    print(
        f"each unit in its own process (1 thread each) {processes:.1f} s: "
        f"cluster / (processes / {cores}) = {ratio_processes:.2f}"
    )
    # Where the cluster's wall time goes: the jobs' own time (their sum over the cores is the best
    # the node could do with them) and what is left (submission, scheduling, dependencies, idle cores).
    print(
        f"cluster jobs: {len(jobs)}, {sum(jobs):.0f} s of job time in all (sequential units: {sequential:.0f} s); "
        f"job time / {cores} cores = {sum(jobs) / cores:.1f} s of the {cluster:.1f} s wall time"
    )
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
