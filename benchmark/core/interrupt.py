"""Asking the pretraining loop to checkpoint at the step it is on.

A signal handler may fire in the middle of a step (after backward, before the optimizer), where
no consistent state exists. So handlers only leave a request here; the loop reads it at the next
step boundary, writes its checkpoint there and, for STOP, raises Interrupted. Jobs that can be
preempted (slurm/jobs.py) install their handlers; a plain `bench run` installs `stop_on_sigterm`.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

CHECKPOINT = "checkpoint"  # save now, keep training (SIGTERM: the job may be killed soon)
STOP = "stop"  # save now and stop (preemption / timeout: the job is requeued)

_request: str | None = None
_listening = False


class Interrupted(BaseException):
    """Pretraining stopped on request after writing a checkpoint at `step`.

    A BaseException, like KeyboardInterrupt: the run did not fail, so the runner must not write a
    failed record for it.
    """

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"pretraining stopped on request at step {step}; checkpoint {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


def request(kind: str) -> None:
    global _request
    # A stop outranks a checkpoint asked for earlier and not yet served.
    if _request != STOP:
        _request = kind


def take() -> str | None:
    """The pending request, cleared."""
    global _request
    kind, _request = _request, None
    return kind


def listening() -> bool:
    """Whether a pretraining loop is running and will serve requests."""
    return _listening


@contextmanager
def served_by_loop():
    global _listening, _request
    _listening, _request = True, None
    try:
        yield
    finally:
        _listening = False


@contextmanager
def stop_on_sigterm():
    """While pretraining, SIGTERM (kill, a scheduler, a container runtime stopping the process)
    writes a checkpoint at the step boundary and stops (Interrupted); outside pretraining it ends
    the process as usual."""

    def on_term(signum, frame):
        if listening():
            request(STOP)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
