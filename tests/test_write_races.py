"""Readers racing writers never see a half-written record; a write that fails midway (a full
disk, a file size limit) leaves the previous file as it was."""

import json
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import time

import torch

from benchmark.core import checkpoint as ckpt
from benchmark.records import read_records, write_record

WRITERS, RUNS, ROUNDS = 3, 4, 25
PAYLOAD = 100_000  # large enough that a plain write takes several system calls


def record(writer: int, rnd: int) -> dict:
    return {
        "run_id": f"w{writer}",
        "status": "ok",
        "method": "ijepa",
        "preset": "ijepa",
        "task": "linear",
        "seed": 0,
        "metrics": {},
        "finished": f"{rnd:04d}",
        "writer": writer,
        "round": rnd,
        "payload": "x" * (PAYLOAD + rnd),
        "end": "complete",
    }


def torn_write(run_dir, rec):
    """How a record would be written without atomic_write: truncate, then write in place."""
    path = run_dir / "records" / "linear.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(rec))


def writer(root, index, atomic, stop):
    for rnd in range(ROUNDS):
        if stop.is_set():
            break
        for run in range(RUNS):
            (write_record if atomic else torn_write)(root / f"w{index}-run{run}", record(index, rnd))


def race(root, atomic, max_seconds):
    """Scan the records while the writers write; returns (complete reads, torn reads)."""
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    procs = [ctx.Process(target=writer, args=(root, i, atomic, stop)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    complete, torn, deadline = 0, 0, time.monotonic() + max_seconds
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        problems: list[str] = []
        recs = read_records(root, problems=problems)
        if problems:  # the registry passes over a file it cannot parse, and names it here
            torn += 1
            if not atomic:
                break
            continue
        for r in recs:
            assert r["end"] == "complete" and len(r["payload"]) == PAYLOAD + r["round"]
        complete += len(recs)
    stop.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return complete, torn


def test_readers_racing_writers_never_see_a_partial_record(tmp_path):
    complete, torn = race(tmp_path / "atomic", atomic=True, max_seconds=120)
    assert torn == 0 and complete > 0
    final = read_records(tmp_path / "atomic")
    assert len(final) == WRITERS * RUNS  # nothing lost: every run holds its last round
    assert {r["round"] for r in final} == {ROUNDS - 1}


def test_the_race_does_catch_a_non_atomic_writer(tmp_path):
    # The control: the same reader against truncate-and-write sees torn JSON, so the test above
    # would fail if records were not written atomically.
    _, torn = race(tmp_path / "plain", atomic=False, max_seconds=120)
    assert torn > 0


FAILING_WRITES = """
import errno, sys
import torch
from benchmark.core import checkpoint as ckpt
from benchmark.records import write_record
folder = sys.argv[1]
failures = 0
try:
    write_record(folder, {"task": "linear", "round": 2, "payload": "x" * 200_000})
except OSError as exc:
    failures += exc.errno == errno.EFBIG
try:
    ckpt.save(folder + "/last.pt", {"step": 2, "w": torch.ones(100_000)})
except (OSError, RuntimeError):  # torch reports the failed write as a RuntimeError
    failures += 1
sys.exit(0 if failures == 2 else 3)
"""


def _file_size_limit():
    # In the child before exec: writes past 64 KiB fail with EFBIG, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))


def test_a_write_that_fails_midway_keeps_the_previous_file(tmp_path):
    write_record(tmp_path, record(0, 1))
    ckpt.save(tmp_path / "last.pt", {"step": 1, "w": torch.ones(4)})
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_WRITES, str(tmp_path)],
        preexec_fn=_file_size_limit,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "records" / "linear.json").read_text())["round"] == 1
    assert ckpt.load(tmp_path / "last.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["last.pt", "linear.json"]
