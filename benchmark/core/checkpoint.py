"""Checkpoint files: atomic writes, weights-only reads, corruption detected before use."""

from __future__ import annotations

import argparse
import errno
import os
import pickletools
import re
import resource
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from benchmark.core.errors import CheckpointError, ConfigError
from benchmark.core.faults import fault_point

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write) -> None:
    """Run write(file_object) into a temporary sibling, fsync it, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one; the
    directory is fsynced too, so the rename itself survives a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        # mkstemp makes the file private (0600); records must stay readable by whoever reads
        # the results folder, as a plain open() would have made them.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
                f.flush()
            except (OSError, RuntimeError) as exc:  # torch reports a failed write as RuntimeError
                code, why = _write_failure(path, exc)
                failure = OSError(f"cannot write {path}: {why}")
                failure.errno = code  # callers may still tell a full disk from a size limit
                raise failure from None
            fault_point(f"write:{path.name}")
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


def _write_failure(path: Path, exc: BaseException) -> tuple[int | None, str]:
    """(errno, why) of a failed write, in words: a full disk or a file size limit rather than
    torch's own text."""
    code = getattr(exc, "errno", None)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code == errno.ENOSPC or shutil.disk_usage(path.parent).free < 64 * 2**20:
        return errno.ENOSPC, "no space left on the device"
    if code == errno.EFBIG or limit != resource.RLIM_INFINITY:
        return errno.EFBIG, f"the file size limit was reached (ulimit -f: {limit} bytes)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return code, f"the write failed ({first})"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of atomic writes killed mid-way under `folder` (any depth).

    Only safe where no other process is writing: a run folder being resumed.
    """
    stale = [p for p in Path(folder).rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def save(path: str | Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def load(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint without executing any pickled code, after checking its CRCs.

    With `mmap` (planning a run: shapes and settings, no weights) the tensors stay on disk until
    touched and the CRCs, whose check reads every byte, are left to the full load that follows.
    """
    path = Path(path)
    if path.is_dir():
        hint = f" (a run folder's is {path / 'checkpoints' / 'last.pt'})" if (path / "checkpoints").is_dir() else ""
        raise CheckpointError(f"checkpoint {path} is a folder, not a file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not mmap:
        _check_crc(path)
    try:
        with torch.serialization.safe_globals(_data_globals()):
            # torch memory-maps zip-format files only; a legacy-format file is small and read whole.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for torn, foreign or code-carrying files
        code = _code_objects(path)
        if not code:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            code = [found.group(1)] if found else []
        if code:
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds objects that run code when loaded "
                f"({', '.join(code[:5])}), refused: checkpoints are read weights-only"
            ) from None
        if str(exc).startswith("Weights only load failed"):
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds pickled Python objects other than tensors and "
                "plain containers, refused: checkpoints are read weights-only"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None


# Globals a checkpoint's pickle may name: torch's tensor rebuilders and storages, the containers
# and numbers the weights-only loader accepts, and what official training checkpoints hold
# besides (DINO's): their command-line arguments (argparse.Namespace, an attribute bag) and numpy
# scalars (a dtype and raw bytes; the optimizer's lr and weight decay come from numpy schedules).
SAFE_GLOBALS = (
    "torch.",
    "collections.OrderedDict",
    "builtins.set",
    "builtins.frozenset",
    "_codecs.encode",
    "argparse.Namespace",
    "numpy.dtype",
    "numpy.dtypes.",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar",
)


def _data_globals() -> list:
    """The classes and functions behind SAFE_GLOBALS' non-torch names, for torch's weights-only
    unpickler (numpy 1 spells its scalar rebuilder numpy.core, numpy 2 numpy._core)."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [argparse.Namespace, np.dtype, multiarray.multiarray.scalar, *dtypes]


def _code_objects(path: Path) -> list[str]:
    """The module.name of every global the file's pickle would import, other than SAFE_GLOBALS,
    read without unpickling (pickletools); [] for a file that is not a readable pickle."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            data = path.read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings = [*strings[-1:], str(arg)]
            elif op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                found.append(".".join(strings))
    except Exception:  # noqa: BLE001 (not a pickle, or torn: torch's own error says so)
        return []
    found = [g.replace("__builtin__.", "builtins.", 1) for g in found]  # protocol 2 spells it so
    return sorted({g for g in found if not g.startswith(SAFE_GLOBALS)})


def written_by(path: str | Path) -> str | None:
    """The method name a `bench run` checkpoint was written by, read without loading its tensors
    (memory-mapped, weights-only); None for any other file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (not a readable bench checkpoint: the full load says why)
        return None
    method = state.get("method") if isinstance(state, dict) else None
    return method.get("method") if isinstance(method, dict) else None


def foreign_run(path: Path, saved: str | None, method: str) -> CheckpointError:
    """The refusal of a run folder's checkpoint written by another method's run."""
    if saved is None:
        return CheckpointError(f"checkpoint {path} was not written by bench run: start this run in a new run folder")
    return CheckpointError(
        f"checkpoint {path} was written by a method={saved} run, not this method={method} run: "
        f"resume that run with method={saved}, or start this one in a new run folder"
    )


def _check_crc(path: Path) -> None:
    """Refuse a zip-format checkpoint (torch >= 1.6) whose stored CRC32s do not match its bytes.

    torch.load does not check them: a flipped bit in a tensor loads silently as a wrong weight.
    Files in torch's legacy format carry no checksum and are left to torch.load.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated: its zip directory (at the end of the file) is missing")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt zip archive ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch in record {bad!r}")


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that refuses missing, unexpected and mis-shaped keys, naming them.

    A module on the meta device (a run being planned) gets the key and shape checks only: it has
    no storage to load into, and the values are checked when the run loads them for real.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    misshaped = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{what} does not match the model: {'; '.join(problems)}")
    if any(t.is_meta for t in own.values()):
        return
    non_finite = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(f"{what} holds NaN or inf in {len(non_finite)} tensors: {', '.join(non_finite[:4])}")
    module.load_state_dict(weights, strict=True)


def strip_prefix(weights: dict, prefix: str = "module.") -> dict:
    """Drop the DistributedDataParallel prefix when every key carries it."""
    if weights and all(k.startswith(prefix) for k in weights):
        return {k[len(prefix) :]: v for k, v in weights.items()}
    return dict(weights)


def check_room(path: Path, file_bytes: int, what: str) -> None:
    """Refuse (ConfigError, before any compute) a folder whose file system cannot take a file of
    `file_bytes` twice over (the new checkpoint is written beside the last one, then replaces it),
    or a file-size limit (ulimit -f) below it."""
    existing = Path(path).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < file_bytes:
        raise ConfigError(
            f"{what}: a checkpoint of about {file_bytes / 2**20:.1f} MiB is over this shell's file size limit "
            f"(ulimit -f: {limit} bytes): raise the limit"
        )
    free = shutil.disk_usage(existing).free
    if free < 2 * file_bytes:
        raise ConfigError(
            f"{what} {path}: {free / 2**20:.1f} MiB free on its file system, the checkpoints need about "
            f"{2 * file_bytes / 2**20:.1f} MiB: free some space or choose another run_dir"
        )


def check_writable_folder(path: Path, what: str) -> None:
    """Refuse (ConfigError, before any compute) a folder that cannot be created or written: an
    existing file on its path, or a read-only ancestor."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be written: {existing} is read-only for this user")
