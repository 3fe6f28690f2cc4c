"""The error types of the harness, one per kind of problem.

Raised before compute (bad input: the CLI exits 2 with the message) or during it (exit 1).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A command line or config that cannot describe a run."""


class DataError(ValueError):
    """A dataset folder that cannot be used as configured."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit what it is loaded into."""


class DivergenceError(RuntimeError):
    """A training loss (pretraining or any task) stopped being finite."""


def one_line(exc: BaseException) -> str:
    """'Type: message' on one line; an error raised in a DataLoader worker, which torch re-raises
    with the worker's traceback in its message, is reduced to the original error's own line."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        name, _, message = last.partition(": ")
        return f"{name.rpartition('.')[2]}: {message}" if message else last.strip()
    return f"{type(exc).__name__}: {' '.join(text.split())}" if text else type(exc).__name__
