"""Where each unit of a sweep stands: done or failed (its record), running or pending (its SLURM job
or local process), or not submitted; and the table `bench status` prints. Read from the sweep
folder and the scheduler only, so any machine that sees both can answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from slurm.jobs import PRETRAIN, record_path

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
NOT_SUBMITTED = "not submitted"
SLURM_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "CONFIGURING"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


@dataclass
class UnitState:
    unit: str  # "<cell>/pretrain" or "<cell>/<task>"
    state: str  # pending / running / done / failed
    reason: str = ""
    job_id: str | None = None
    log: str | None = None
    record: dict | None = None


def unit_dir(sweep_dir: Path, unit: str) -> Path:
    # Flat and unique: the folder name is the run id its records carry.
    return sweep_dir / unit.replace("/", ".")


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _queue_states(job_ids: list[str]) -> dict[str, str]:
    """State of every queued or running job (array tasks one per line, as '<array>_<index>'), from
    squeue: sacct does not list array tasks that have not started yet."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(arrays)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout  # exits non-zero once every job has left the queue: nothing queued
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = {}
    for line in out.splitlines():
        job, state, reason = (line.strip().split("|") + ["", ""])[:3]
        rows[job] = f"{state} ({reason})" if reason not in ("", "None") else state
    return rows


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state of each job (array tasks as '<array>_<index>'): squeue for the ones still queued
    or running, sacct for the others."""
    if not job_ids:
        return {}
    queued = _queue_states(job_ids)
    try:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-o", "JobID,State,Reason", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        if queued:
            out = ""
        else:
            return {j: f"UNKNOWN (sacct: {' '.join(str(exc).split())[:120]})" for j in job_ids}
    rows = {}
    for line in out.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        rows[job] = f"{state} ({reason})" if reason not in ("", "None") else state
    states = {}
    for job in job_ids:
        array = job.split("_")[0] + "_["  # array tasks not started yet show as 12_[0-3]
        state = (
            queued.get(job)
            or rows.get(job)
            or next((s for k, s in queued.items() if k.startswith(array)), None)
            or next((s for k, s in rows.items() if k.startswith(array)), None)
        )
        states[job] = state or "UNKNOWN (not in squeue or sacct)"
    return states


def _job_state(job: dict, slurm: dict[str, str]) -> tuple[str, str]:
    if "pid" in job:  # launcher=local: the process that ran it
        if job["host"] == socket.gethostname() and _pid_alive(job["pid"]) and not job.get("ended"):
            return RUNNING, ""
        return FAILED, job.get("error") or "ended without writing a record"
    state = slurm.get(job["job_id"], "UNKNOWN")
    word = state.split()[0]
    if word in SLURM_PENDING:
        return PENDING, f"SLURM {state}"
    if word in SLURM_RUNNING:
        return RUNNING, ""
    if word == "COMPLETED":
        return FAILED, "job completed without writing a record"
    return FAILED, f"SLURM {state}"


def unit_states(sweep_dir: Path, manifest: dict) -> list[UnitState]:
    """Every unit of the sweep, cells in order, pretraining first (none for a cell given a checkpoint)."""
    units = [
        (cell, unit)
        for cell, spec in manifest["cells"].items()
        for unit in [*([] if spec.get("checkpoint") else [PRETRAIN]), *spec["tasks"]]
    ]
    jobs = manifest["jobs"]
    slurm = slurm_states(
        sorted({jobs[f"{c}/{u}"]["job_id"] for c, u in units if f"{c}/{u}" in jobs and "job_id" in jobs[f"{c}/{u}"]})
    )
    states = []
    for cell, unit in units:
        key = f"{cell}/{unit}"
        job = jobs.get(key)
        log = job.get("log") if job else None
        job_id = job.get("job_id") if job else None
        record = _read_record(record_path(unit_dir(sweep_dir, key), unit))
        if record is not None:
            ok = record["status"] == "ok"
            states.append(
                UnitState(key, DONE if ok else FAILED, "" if ok else record.get("error") or "", job_id, log, record)
            )
        elif job is None:
            states.append(UnitState(key, PENDING, NOT_SUBMITTED))
        else:
            state, reason = _job_state(job, slurm)
            states.append(UnitState(key, state, reason, job_id, log))
    return states


def status_table(sweep_dir: Path, states: list[UnitState]):
    from rich.table import Table

    counts = {s: sum(u.state == s for u in states) for s in (DONE, RUNNING, PENDING, FAILED)}
    table = Table(title=f"sweep {sweep_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for column in ("unit", "state", "job", "reason / result", "log"):
        table.add_column(column, overflow="fold")
    colour = {DONE: "green", RUNNING: "cyan", PENDING: "yellow", FAILED: "red"}
    for st in states:
        detail = st.reason
        if st.state == DONE and st.record:
            from benchmark.leaderboard import headline

            metric, value = headline(st.record)
            detail = f"{metric} {value:.4g}" if value is not None else ""
        table.add_row(
            st.unit, f"[{colour[st.state]}]{st.state}[/]", st.job_id or "", detail, st.log if st.state == FAILED else ""
        )
    return table
