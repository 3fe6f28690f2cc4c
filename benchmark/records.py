"""Run records: one JSON file per (run, task), written atomically; read back into a DataFrame.

Run folder layout (documented in README.md):
    <run_dir>/config.yaml            the resolved config of the run
    <run_dir>/checkpoints/last.pt    pretraining checkpoint (latest; also the final one)
    <run_dir>/train_log.jsonl        step, epoch, loss, lr, weight decay every log_every steps
    <run_dir>/records/<task>.json    one record per task ("pretrain" included)
    <run_dir>/records/<task>.random_init.json
                                     the same task on the random-init encoder (the control)
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

from benchmark.core import threads
from benchmark.core.checkpoint import atomic_write
from benchmark.core.stats import Evidence
from tasks import TASKS

SCHEMA_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parent.parent

PRETRAINED, RANDOM_INIT = "pretrained", "random"
CONTROL_SUFFIX = ".random_init"


def is_control(record: dict) -> bool:
    """Whether a record is of the random-init control (records before controls have no `init`)."""
    return record.get("init", PRETRAINED) == RANDOM_INIT


def step_name(task: str, init: str = PRETRAINED) -> str:
    """The file stem of a task's record (and evidence) in a run folder's records/."""
    return task + CONTROL_SUFFIX if init == RANDOM_INIT else task


def git_commit() -> str | None:
    """The commit of the harness code (with '+dirty' when it has uncommitted changes)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def make_record(
    *,
    run_id: str,
    run_dir: Path,
    task: str,
    config: dict,
    metrics: dict,
    status: str,
    started: str,
    wall_seconds: float,
    checkpoint_path: str | None,
    checkpoint_key: str,
    device: str,
    error: str | None = None,
    examples: dict | None = None,
    init: str = PRETRAINED,
) -> dict[str, Any]:
    choices = config["choices"]
    return {
        "schema": SCHEMA_VERSION,
        "run_id": run_id,
        "run_dir": str(run_dir),
        "status": status,
        "error": error,
        "method": config["method"]["name"],
        "preset": choices["method"],
        "task": task,
        # pretrained, or random: the control, the same task on the random-init encoder of the run's
        # seed and architecture.
        "init": init,
        "model": choices["model"],
        "data": config["data"]["name"],
        "seed": config["seed"],
        "metrics": metrics,
        "examples": examples,
        "checkpoint": {"path": checkpoint_path, "key": checkpoint_key},
        "started": started,
        "finished": now(),
        "wall_seconds": wall_seconds,
        "host": socket.gethostname(),
        "device": device,
        **threads.current(),
        "git_commit": git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "config": config,
    }


# Pretraining's record is ranked by its loss; every task by the headline it declares.
def data_label(record: dict) -> str:
    """The data configuration behind a record, as tables name it: two runs whose labels differ were
    not evaluated on the same data (generator version, size, split sizes, folder, label column)."""
    d = record.get("config", {}).get("data", {})
    parts = [str(record["data"])]
    if d.get("kind") == "builtin":
        parts += [f"v{d.get('version')}", f"{d.get('image_size')}px", f"{d.get('num_train')}/{d.get('num_val')}"]
        parts += [d["label"]] if d.get("label") else []
    elif d:
        parts += [str(d.get("root")), f"{d.get('image_size')}px"]
        parts += [f"{d['labels_csv']}:{d.get('label_column')}"] if d.get("labels_csv") else []
    return " ".join(parts)


PRETRAIN_HEADLINE = "final_loss"
LOWER_IS_BETTER = {"final_loss"}


def headline_metric(task: str) -> str:
    """The one metric a task's records are ranked and tabulated by."""
    return TASKS[task].headline if task in TASKS else PRETRAIN_HEADLINE


def headline(record: dict) -> tuple[str, float | None]:
    """(metric, value) of a record's headline; the value is None when the record lacks it."""
    metric = headline_metric(record["task"])
    value = record.get("metrics", {}).get(metric)
    return metric, float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def non_finite_metrics(metrics, prefix: str = "") -> list[str]:
    """Dotted keys of every NaN or infinite number in a (nested) metrics dict or list."""
    if isinstance(metrics, dict):
        return [k for key, v in metrics.items() for k in non_finite_metrics(v, f"{prefix}{key}.")]
    if isinstance(metrics, (list, tuple)):
        return [k for i, v in enumerate(metrics) for k in non_finite_metrics(v, f"{prefix}{i}.")]
    if isinstance(metrics, float) and not math.isfinite(metrics):
        return [prefix.rstrip(".")]
    return []


EXAMPLES_SUFFIX = ".examples.npz"


def write_evidence(run_dir: Path, step: str, evidence: Evidence) -> dict:
    """Store a step's per-example evidence beside its record; returns what the record says of it."""
    name = f"{step}{EXAMPLES_SUFFIX}"
    data = evidence.to_bytes()
    atomic_write(Path(run_dir) / "records" / name, lambda f: f.write(data))
    return {
        "file": name,
        "kind": evidence.kind,
        "n": evidence.n,
        "fingerprint": evidence.fingerprint,
        "bytes": len(data),
    }


def read_evidence(record: dict) -> Evidence | None:
    """The per-example evidence a record points to; None for a record without any."""
    examples = record.get("examples")
    if not examples:
        return None
    return Evidence.from_bytes((Path(record["run_dir"]) / "records" / examples["file"]).read_bytes())


def write_record(run_dir: Path, record: dict) -> Path:
    path = Path(run_dir) / "records" / f"{step_name(record['task'], record.get('init', PRETRAINED))}.json"
    data = json.dumps(record, indent=2, sort_keys=False, default=str).encode()
    atomic_write(path, lambda f: f.write(data))
    return path


REQUIRED_KEYS = ("run_id", "status", "method", "preset", "task", "seed", "metrics", "finished")


def read_records(*folders: str | Path, problems: list[str] | None = None) -> list[dict]:
    """Every record under the given folders (any depth), oldest first.

    Safe while jobs are writing: records appear by an atomic rename, and the temporary files that
    precede them do not match `records/*.json`. A file that vanishes (a run folder being removed)
    is passed over; one that is not a record (hand-edited, another tool's) is passed over and
    named in `problems`.
    """
    records = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("records/*.json")):
            try:
                record = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                if problems is not None:
                    problems.append(f"{path}: unreadable ({type(exc).__name__})")
                continue
            missing = [k for k in REQUIRED_KEYS if not isinstance(record, dict) or k not in record]
            if missing:
                if problems is not None:
                    problems.append(f"{path}: not a run record (missing {', '.join(missing)})")
                continue
            records.append(record)
    return sorted(records, key=lambda r: r["finished"])
