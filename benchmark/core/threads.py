"""How many threads a process's CPU thread pools get: what it was given, never the whole node.

A job that shares a node with others must not run as many OpenMP threads as the node has cores:
two 1-CPU jobs on a 2-core node, each with 2 spinning threads, run several times slower than
with one each (docs/performance.md). The count comes from, in this order:

    OMP_NUM_THREADS       the user's explicit choice (torch already read it at start-up)
    threads=N             the run's setting (launchers pass their cpus_per_task this way)
    SLURM_CPUS_PER_TASK   the SLURM allocation, or the affinity mask when that is narrower
    the affinity mask     the CPUs this process may run on (a cgroup / taskset / SLURM binding)

DataLoader workers run one thread each (torch sets that in every worker).
"""

from __future__ import annotations

import os

import torch

_CURRENT: tuple[int, str] | None = None


def _positive(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() and int(text) > 0 else None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_count(setting: int | None = None) -> tuple[int, str]:
    """(threads, where the number came from), by the order in the module docstring."""
    omp = _positive(os.environ.get("OMP_NUM_THREADS"))
    if omp:
        return omp, "OMP_NUM_THREADS"
    if setting:
        return int(setting), "threads"
    mask = usable_cpus()
    slurm = _positive(os.environ.get("SLURM_CPUS_PER_TASK"))
    if slurm and slurm <= mask:
        return slurm, "SLURM_CPUS_PER_TASK"
    return mask, "affinity mask"


def use_threads(setting: int | None = None) -> tuple[int, str]:
    """Size torch's intra-op pool (and OpenMP's) by thread_count; returns what was set."""
    global _CURRENT
    count, source = thread_count(setting)
    torch.set_num_threads(count)
    _CURRENT = (count, source)
    return _CURRENT


def current() -> dict:
    """What the records say: the thread count in use and where it came from."""
    count, source = _CURRENT or (torch.get_num_threads(), "torch default")
    return {"threads": count, "threads_from": source}
