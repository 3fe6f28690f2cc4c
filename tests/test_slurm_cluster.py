"""Against a real SLURM cluster on this machine (slurm/cluster.sh start; CI starts one).

A tiny sweep goes through pretraining -> dependent evaluation array -> leaderboard; a resubmission
submits nothing; a job sent the preemption signal mid-pretraining is checkpointed at that step,
requeued, and ends with the same records as its uninterrupted twin, also when the signal reaches
only one task of a 2-task (data-parallel) job.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import submitit

pytestmark = pytest.mark.slow


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        return False
    try:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return (
        nodes.returncode == 0
        and any(s.startswith(("idle", "mixed", "alloc")) for s in nodes.stdout.split())
        and acct.returncode == 0
    )


if not _cluster_up():
    pytest.skip(
        "no SLURM cluster with accounting runs here (start one: sudo slurm/cluster.sh start)", allow_module_level=True
    )

LAUNCHER = "launcher=slurm_localhost"


def manifest(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


def wait_for_sweep(bench, sweep_dir: Path, timeout: float) -> dict:
    """Poll the sweep's own status until nothing is pending or running."""
    from slurm.states import PENDING, RUNNING, unit_states

    deadline = time.time() + timeout
    while time.time() < deadline:
        states = unit_states(sweep_dir, manifest(sweep_dir))
        if not any(s.state in (PENDING, RUNNING) for s in states):
            return {s.unit: s for s in states}
        time.sleep(3)
    proc = bench("status", str(sweep_dir))
    raise AssertionError(f"sweep not finished after {timeout}s:\n{proc.stdout}")


def sacct_times(job_id: str, timeout: float = 120) -> tuple[str, str, str]:
    """(state, start, end) once the job has ended: a record is written a moment before its job exits."""
    deadline = time.time() + timeout
    while True:
        out = (
            subprocess.run(
                ["sacct", "-n", "-P", "-X", "-o", "State,Start,End", "-j", job_id],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
        state, start, end = out[-1].split("|")
        if end != "Unknown" or time.time() > deadline:
            return state, start, end
        time.sleep(2)


def test_sweep_runs_pretraining_then_dependent_evaluations(bench, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = bench("sweep", "ci", LAUNCHER, f"sweep_dir={sweep_dir}", check=0)
    jobs = manifest(sweep_dir)["jobs"]
    assert len(jobs) == 8, proc.stdout  # 4 cells x (pretraining + linear)

    # The evaluation jobs carry the real sbatch dependency on their cell's pretraining job.
    for cell in ("ijepa_seed0", "ijepa_seed1", "iwm_seed0", "iwm_seed1"):
        pre, lin = jobs[f"{cell}/pretrain"]["job_id"], jobs[f"{cell}/linear"]["job_id"]
        assert jobs[f"{cell}/linear"]["after"] == pre
        shown = subprocess.run(["scontrol", "show", "job", lin], capture_output=True, text=True).stdout
        assert (
            f"Dependency=afterok:{pre}" in shown
            or "Dependency=(null)" in shown
            and sacct_times(pre, timeout=0)[0] == "COMPLETED"
        ), shown

    # Submitted again at once, while the evaluation arrays still wait on their pretraining jobs
    # (pending, reason Dependency: sacct does not list them yet): every unit is queued, nothing is
    # submitted twice, and the manifest keeps tracking the first jobs.
    queued = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split()
    at_once = bench("sweep", "ci", LAUNCHER, f"sweep_dir={sweep_dir}", check=0)
    assert "submitted" not in at_once.stdout, at_once.stdout
    assert manifest(sweep_dir)["jobs"] == jobs
    again = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(again) <= set(queued), (queued, again)  # no new job entered the queue

    states = wait_for_sweep(bench, sweep_dir, timeout=900)
    assert all(s.state == "done" for s in states.values()), {u: (s.state, s.reason, s.log) for u, s in states.items()}
    for cell in ("ijepa_seed0", "ijepa_seed1", "iwm_seed0", "iwm_seed1"):
        pre_state, _, pre_end = sacct_times(jobs[f"{cell}/pretrain"]["job_id"])
        lin_state, lin_start, _ = sacct_times(jobs[f"{cell}/linear"]["job_id"])
        assert pre_state == lin_state == "COMPLETED"
        assert lin_start >= pre_end  # ISO timestamps: the array waited for its pretraining
        rec = states[f"{cell}/linear"].record
        assert rec["checkpoint"]["path"] == str(sweep_dir / f"{cell}.pretrain" / "checkpoints" / "last.pt")
        # 1 CPU per task (slurm_localhost): one torch thread, read from the allocation.
        assert (rec["threads"], rec["threads_from"]) == (1, "SLURM_CPUS_PER_TASK"), rec["threads_from"]

    status = bench("status", str(sweep_dir), check=0)
    assert "8 done, 0 running, 0 pending, 0 failed" in " ".join(status.stdout.split())

    bench("leaderboard", str(sweep_dir), "--out", str(tmp_path / "board"), check=0)
    table = (tmp_path / "board" / "leaderboard.md").read_text()
    for preset in ("ijepa / ijepa", "iwm / iwm"):
        assert preset in table
    csv = (tmp_path / "board" / "leaderboard.csv").read_text()
    assert csv.count(",2,") == 2, csv  # every cell counted: 2 seeds per method

    again = bench("sweep", "ci", LAUNCHER, f"sweep_dir={sweep_dir}", check=0)
    assert "nothing to submit" in again.stdout and "submitted" not in again.stdout, again.stdout
    assert manifest(sweep_dir)["jobs"] == jobs


UNIT = "ijepa_seed3/pretrain"


def wait_until_training(log: Path, timeout: float = 600) -> None:
    """Until the pretraining job has logged two steps (it runs, mid-epoch)."""
    deadline = time.time() + timeout
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert time.time() < deadline, "the pretraining job never started"
        time.sleep(0.5)


def assert_resumed_like_its_twin(hit: Path, twin: Path, states: dict, twin_states: dict) -> str:
    """The preempted job stopped mid-run, was requeued, and ended with its twin's records and
    losses (every step logged once); returns its job id."""
    job_id = manifest(hit)["jobs"][UNIT]["job_id"]
    err = Path(manifest(hit)["jobs"][UNIT]["log"])  # the job's stderr; stdout beside it
    out = err.with_suffix(".out").read_text()
    stopped = [line for line in out.splitlines() if line.startswith("preempted: pretraining stopped")]
    assert stopped, out + err.read_text()[-3000:]
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert 2 <= step < 30  # a checkpoint mid-run, not at an epoch end or the end
    restarts = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-o", "State", "-j", job_id], capture_output=True, text=True
    ).stdout.split()
    assert "REQUEUED" in restarts or len(restarts) > 1, restarts
    for task in ("pretrain", "linear"):
        a, b = states[f"ijepa_seed3/{task}"].record, twin_states[f"ijepa_seed3/{task}"].record
        assert a["status"] == b["status"] == "ok"
        keep = ("train_seconds", "images_per_second", "checkpoint")
        assert {k: v for k, v in a["metrics"].items() if k not in keep} == {
            k: v for k, v in b["metrics"].items() if k not in keep
        }
    logs = [run / "ijepa_seed3.pretrain" / "train_log.jsonl" for run in (hit, twin)]
    losses = [[json.loads(line)["loss"] for line in log.read_text().splitlines()] for log in logs]
    assert losses[0] == losses[1]  # every step logged once, with the twin's loss
    return job_id


def test_preempted_job_resumes_to_its_twins_result(bench, tmp_path):
    twin, hit = tmp_path / "twin", tmp_path / "preempted"
    bench("sweep", "ci_preempt", LAUNCHER, f"sweep_dir={twin}", check=0)
    bench("sweep", "ci_preempt", LAUNCHER, f"sweep_dir={hit}", check=0)
    job_id = manifest(hit)["jobs"][UNIT]["job_id"]
    wait_until_training(hit / "ijepa_seed3.pretrain" / "train_log.jsonl")
    submitit.SlurmJob(hit / "logs" / "%j", job_id)._interrupt()  # SIGTERM then SIGUSR2, as SLURM preempts

    states = wait_for_sweep(bench, hit, timeout=900)
    twin_states = wait_for_sweep(bench, twin, timeout=300)
    assert_resumed_like_its_twin(hit, twin, states, twin_states)


def test_a_two_task_job_pretrains_data_parallel_like_one_process(bench, tmp_path):
    """launcher.tasks_per_node=2: submitit starts two ranks, which meet through the job environment
    (gloo) and train MAE on halves of every batch; the result follows the one-process run."""
    common = [
        "model=vit_micro",
        "model.depth=2",
        "method=mae",
        "pretrain=mae_cpu",
        "method.predictor.depth=1",
        "method.predictor.width=48",
        "data.num_train=64",
        "data.num_val=48",
        "pretrain.epochs=1",
        "pretrain.batch_size=8",
        "pretrain.log_every=1",
        "task=linear",
        "tasks.linear.epochs=1",
        "progress=false",
    ]
    bench("run", *common, f"run_dir={tmp_path / 'one'}", check=0)
    proc = bench(
        "run",
        *common,
        LAUNCHER,
        "launcher.tasks_per_node=2",
        "launcher.wait=true",
        f"run_dir={tmp_path / 'two'}",
        check=0,
    )
    job_id = proc.stdout.split("submitted job ")[1].split()[0]
    tasks = subprocess.run(
        ["sacct", "-n", "-P", "-o", "NTasks", "-j", f"{job_id}.0"], capture_output=True, text=True
    ).stdout.split()
    assert tasks and tasks[0] == "2", tasks  # the job step really ran two tasks
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    assert len(losses[0]) == 8
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    rec = json.loads((tmp_path / "two" / "records" / "linear.json").read_text())
    assert rec["status"] == "ok"


def rank_pid(job_id: str, rank: int, timeout: float = 120) -> int:
    """The PID of one task (global rank) of a running job, from `scontrol listpids`: the lowest PID
    of the task is its process, higher ones are its children (loader workers)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        listed = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True).stdout
        pids = [
            int(cols[0])
            for cols in (line.split() for line in listed.splitlines()[1:])
            if len(cols) >= 5 and cols[4] == str(rank)
        ]
        if pids:
            return min(pids)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} has no task of rank {rank}")


def test_one_task_of_a_two_task_job_preempted_resumes_to_the_uninterrupted_result(bench, tmp_path):
    """SLURM's preemption signal (USR2) reaches one task of a 2-task I-JEPA pretraining job: both
    ranks stop at the same step, rank 0 checkpoints and requeues the job, which resumes; records
    and train log equal the same 2-task job run uninterrupted."""
    two = [LAUNCHER, "launcher.tasks_per_node=2"]
    twin, hit = tmp_path / "twin", tmp_path / "preempted"
    bench("sweep", "ci_preempt", *two, f"sweep_dir={twin}", check=0)
    twin_states = wait_for_sweep(bench, twin, timeout=900)
    bench("sweep", "ci_preempt", *two, f"sweep_dir={hit}", check=0)
    job_id = manifest(hit)["jobs"][UNIT]["job_id"]
    wait_until_training(hit / "ijepa_seed3.pretrain" / "train_log.jsonl")
    os.kill(rank_pid(job_id, 1), signal.SIGUSR2)  # rank 1 only; rank 0 hears it from rank 1

    states = wait_for_sweep(bench, hit, timeout=900)
    assert_resumed_like_its_twin(hit, twin, states, twin_states)
    ntasks = subprocess.run(
        ["sacct", "-n", "-P", "-o", "NTasks", "-j", f"{job_id}.0"], capture_output=True, text=True
    ).stdout.split()
    assert ntasks and ntasks[0] == "2", ntasks
