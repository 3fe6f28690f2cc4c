"""Checkpoint files: atomic writes, weights-only reads."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit what it is loaded into."""


def atomic_write(path: str | Path, write) -> None:
    """Run write(file_object) into a temporary sibling, fsync it, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(path: str | Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for torn, foreign or code-carrying files
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if code:
            raise CheckpointError(f"cannot read checkpoint {path}: loading it would run pickled code "
                                  f"({code.group(1)}), refused (checkpoints are read weights-only)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that refuses missing, unexpected and mis-shaped keys, naming them."""
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    misshaped = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
                 for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if keys]
    if problems:
        raise CheckpointError(f"{what} does not match the model: {'; '.join(problems)}")
    module.load_state_dict(weights, strict=True)
