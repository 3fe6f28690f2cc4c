"""What a sweep runs: one cell's pretraining, or one task on a cell's pretrained checkpoint.

A job is a submitit Checkpointable, so it is requeued on preemption and timeout. Submitit's own
handler would checkpoint (pickle this object) and exit from inside the signal handler, at any
point of a training step; here the preemption signal (SIGUSR2, `--signal=USR2@90`) first asks the
pretraining loop to write its checkpoint at the next step boundary (benchmark/core/interrupt.py), and
only then hands over to submitit's handler, which requeues. SIGTERM (sent first on preemption,
and by scancel) writes a checkpoint at the step boundary and keeps going: SLURM decides whether
the job ends or comes back. A requeued job re-enters __call__ and resumes from the run folder.

The same objects run in-process for `launcher=local`, where no handler is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import submitit
from omegaconf import OmegaConf

from benchmark.config import load_config
from benchmark.core import checkpoint as ckpt
from benchmark.core import distributed, interrupt
from benchmark.pretrain import LAST
from benchmark.runner import LOCK_FILE, execute, plan_run

PRETRAIN = "pretrain"
REQUEUE_GRACE_S = 300


def record_path(run_dir: str | Path, task: str) -> Path:
    return Path(run_dir) / "records" / f"{task}.json"


def overrides_for(overrides: list[str], task: str | None) -> list[str]:
    """A sweep's shared overrides as one job needs them: `tasks.<name>.*` settings exist only in a
    run of that task, so each job keeps its own task's and drops the others'."""
    own = f"tasks.{task}."
    return [o for o in overrides if not o.startswith("tasks.") or (task and o.startswith(own))]


class SweepJob(submitit.helpers.Checkpointable):
    """`bench run` semantics for one unit of a sweep: task=None pretrains, else evaluates checkpoint_path."""

    def __init__(self, overrides: list[str], run_dir: str, task: str | None = None, checkpoint_path: str | None = None):
        self.overrides = list(overrides)
        self.run_dir = str(run_dir)
        self.task = task
        # Not `checkpoint`: that name is Checkpointable's method, which submitit calls to requeue.
        self.checkpoint_path = checkpoint_path

    @property
    def record_name(self) -> str:
        return self.task or PRETRAIN

    def run_overrides(self) -> list[str]:
        # A folder left by an earlier attempt (preempted, failed, retried) is continued.
        resume = (Path(self.run_dir) / "config.yaml").is_file()
        fixed = [f"run_dir={self.run_dir}", f"resume={str(resume).lower()}", "launcher=local", "progress=false"]
        if self.task is None:
            fixed.append("task=none")
        else:
            fixed += [f"checkpoint={self.checkpoint_path}", f"task={self.task}"]
        return overrides_for(self.overrides, self.task) + fixed

    def prepare_folder(self) -> None:
        """A unit folder without config.yaml (its job died while creating it, or it was emptied by
        hand) cannot be resumed as it is. With a checkpoint, the checkpoint's own config becomes
        the folder's (resume then checks it against this unit's); an empty folder is removed; any
        other leftover is moved aside, named in one line, and the unit starts again."""
        run = Path(self.run_dir)
        if not run.is_dir() or (run / "config.yaml").is_file():
            return
        last = run / "checkpoints" / LAST
        stored = ckpt.load(last).get("config") if last.is_file() else None
        if stored:
            text = OmegaConf.to_yaml(OmegaConf.create(stored)).encode()
            ckpt.atomic_write(run / "config.yaml", lambda f: f.write(text))
            print(f"{run}: no config.yaml; continuing from {last} with the config stored in it", flush=True)
            return
        if not any(p.is_file() and p.name != LOCK_FILE for p in run.rglob("*")):
            shutil.rmtree(run)
            return
        aside = run.with_name(f"{run.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
        run.rename(aside)
        print(f"{run} held no config.yaml and no checkpoint to continue from: moved to {aside}", flush=True)

    def __call__(self) -> list[dict]:
        done = record_path(self.run_dir, self.record_name)
        if done.is_file():
            record = json.loads(done.read_text())
            if record["status"] == "ok":  # requeued after it finished: nothing left to do
                return [record]
        self.prepare_folder()
        with _preemption_handlers() as requeue:
            plan = plan_run(load_config(self.run_overrides()))
            try:
                return execute(plan)
            except interrupt.Interrupted as stopped:
                print(f"preempted: {stopped}; requeueing", flush=True)
                requeue()  # on rank 0: requeues the whole job and exits this process
                if not distributed.current().is_main:
                    # Another rank of a data-parallel job: exiting with an error could end the job
                    # before rank 0's requeue lands; the requeue stops this process instead.
                    time.sleep(REQUEUE_GRACE_S)
                raise


@contextmanager
def _preemption_handlers():
    """Route SIGUSR2/SIGTERM through the pretraining loop; yields the call that requeues the job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        yield lambda: None
        return
    usr2 = submitit.JobEnvironment._usr_sig()
    submitit_handler = signal.getsignal(usr2)

    def on_preempt(signum, frame):
        if interrupt.listening():
            interrupt.request(interrupt.STOP)
        else:  # not pretraining: nothing finer to save than what submitit saves
            submitit_handler(signum, frame)

    def on_term(signum, frame):
        interrupt.request(interrupt.CHECKPOINT)

    previous_term = signal.signal(signal.SIGTERM, on_term)
    signal.signal(usr2, on_preempt)
    try:
        # submitit's handler pickles this job, runs `scontrol requeue` and exits the process.
        yield lambda: submitit_handler(usr2, None)
    finally:
        signal.signal(usr2, submitit_handler)
        signal.signal(signal.SIGTERM, previous_term)
