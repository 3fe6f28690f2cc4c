"""Submit one `bench run` as a submitit job.

`launcher=slurm` sends it to a SLURM cluster with the partition, GPUs, CPUs, memory and time of
the launcher preset; `launcher=submitit_local` runs the very same job in a local background
process (submitit's local executor), which is how to try the cluster path on a laptop. The job
re-plans the run from the same overrides with the run folder fixed, so the folder printed at
submission is the folder the job writes.
"""

from __future__ import annotations

from pathlib import Path

import submitit

from benchmark.config import load_config
from benchmark.runner import execute, plan_run


def run_job(overrides: list[str]) -> list[dict]:
    """The submitted callable: a whole run, returning its records."""
    return execute(plan_run(load_config(overrides)))


def executor_for(launcher: dict, log_dir: Path, single_task: bool = False) -> submitit.AutoExecutor:
    """An executor with the launcher preset's resources; single_task: one process on one node
    (with at most one GPU), what an evaluation job needs whatever pretraining was given."""
    cluster = {"slurm": "slurm", "submitit_local": "local"}[launcher["name"]]
    executor = submitit.AutoExecutor(folder=str(log_dir), cluster=cluster)
    gpus, nodes, tasks = launcher["gpus_per_node"], launcher.get("nodes", 1), launcher.get("tasks_per_node", 1)
    if single_task:
        gpus, nodes, tasks = min(gpus, 1), 1, 1
    params = {
        "timeout_min": launcher["timeout_min"],
        "cpus_per_task": launcher["cpus_per_task"],
        "gpus_per_node": gpus,
        "tasks_per_node": tasks,
        "name": launcher["job_name"],
    }
    if cluster == "slurm":
        params["nodes"] = nodes
        params.update(
            {
                f"slurm_{k}": v
                for k, v in launcher.items()
                if k in ("partition", "account", "qos", "constraint", "mem_gb") and v is not None
            }
        )
        if launcher.get("additional_parameters"):
            params["slurm_additional_parameters"] = dict(launcher["additional_parameters"])
    executor.update_parameters(**params)
    return executor


def log_dir_for(run_dir: Path) -> Path:
    # Beside the run folder, not in it: the job itself creates the run folder.
    return run_dir.parent / ".submitit" / run_dir.name


def submit(overrides: list[str], launcher: dict, run_dir: Path) -> submitit.Job:
    """Submit the run; submitit's logs and pickles go to log_dir_for(run_dir)."""
    job_overrides = [o for o in overrides if not o.startswith(("launcher", "run_dir="))]
    job_overrides += [f"run_dir={run_dir}", "launcher=local", "progress=false"]
    if not any(o.startswith("threads=") for o in overrides):
        # The job's thread pools follow its CPUs per task (a submitit_local job has no SLURM
        # allocation to read them from).
        job_overrides.append(f"threads={launcher['cpus_per_task']}")
    return executor_for(launcher, log_dir_for(run_dir)).submit(run_job, job_overrides)
