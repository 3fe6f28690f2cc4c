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
