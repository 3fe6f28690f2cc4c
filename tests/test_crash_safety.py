"""A real `bench run` killed with SIGKILL at chosen points loses nothing, and resuming it reaches
the weights, losses and metrics of the uninterrupted run; a diverging run stops cleanly.

The kills land deterministically through the documented BENCH_FAULT hook (benchmark/core/faults.py):
the process sends itself SIGKILL at a named point, with no cleanup, as a node failure would.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.core import checkpoint as ckpt

# 32 training images of 32 px, batch 8: 4 steps per epoch, 8 in all; checkpoints after steps 3
# and 6 (written once steps 4 and 7 have shown a finite loss) and at the end.
FAST = [
    "model=vit_micro",
    "model.depth=1",
    "model.embed_dim=48",
    "model.patch_size=4",
    "method.predictor.depth=1",
    "method.predictor.width=24",
    "data.image_size=32",
    "data.num_train=32",
    "data.num_val=16",
    "pretrain.batch_size=8",
    "pretrain.epochs=2",
    "pretrain.warmup_epochs=1",
    "pretrain.bf16=false",
    "pretrain.log_every=1",
    "pretrain.checkpoint_every=3",
    "task=linear",
    "tasks.linear.epochs=2",
    "progress=false",
]
# Measured per run, not results: they differ between any two runs.
TIMING = {"train_seconds", "images_per_second", "checkpoint"}


def bench(
    cwd: Path, cache: Path, *args: str, fault: str | None = None, fault_signal: str = "KILL"
) -> subprocess.CompletedProcess:
    env = dict(os.environ, BENCH_CACHE=str(cache), BENCH_FAULT_SIGNAL=fault_signal)
    env.pop("BENCH_FAULT", None)
    if fault:
        env["BENCH_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "benchmark.cli", "run", *FAST, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def outcome(run: Path) -> dict:
    state = ckpt.load(run / "checkpoints" / "last.pt")
    records = {p.stem: json.loads(p.read_text()) for p in (run / "records").glob("*.json")}
    return {
        "step": state["step"],
        "weights": state["method"]["weights"],
        "optimizer": state["optimizer"],
        "log": (run / "train_log.jsonl").read_text().splitlines(),
        "metrics": {task: {k: v for k, v in r["metrics"].items() if k not in TIMING} for task, r in records.items()},
        "status": {task: r["status"] for task, r in records.items()},
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "cache"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    cwd = tmp_path_factory.mktemp("straight")
    proc = bench(cwd, cache, "run_dir=run")
    assert proc.returncode == 0, proc.stderr
    return outcome(cwd / "run")


# (fault point, what must be on disk right after the kill)
KILLS = {
    # Mid-training, between two checkpoints: the one of step 3 is the latest.
    "step:5": dict(step=3, records=set()),
    # Inside the second checkpoint write (step 6): the temporary file is written, not renamed.
    "write:last.pt@2": dict(step=3, records=set()),
    # Inside the linear-probe record write, after pretraining finished and was recorded.
    "write:linear.json": dict(step=8, records={"pretrain"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(KILLS))
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, cache, uninterrupted, fault):
    killed = bench(tmp_path, cache, "run_dir=run", fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = tmp_path / "run"

    # What was written before the kill is intact and loadable.
    expect = KILLS[fault]
    assert ckpt.load(run / "checkpoints" / "last.pt")["step"] == expect["step"]
    records = {p.stem: json.loads(p.read_text()) for p in (run / "records").glob("*.json")}
    assert set(records) == expect["records"]
    assert all(r["status"] == "ok" for r in records.values())
    if fault.startswith("write:"):
        name = fault.split(":")[1].split("@")[0]
        assert [p.name for p in run.rglob(f".{name}.*.tmp")], "the kill should land inside the write"
    logged = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, len(logged) + 1))

    # Resuming ends where the run that was never killed ended.
    resumed = bench(tmp_path, cache, "run_dir=run", "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    got = outcome(run)
    assert got["step"] == uninterrupted["step"] == 8
    assert got["weights"].keys() == uninterrupted["weights"].keys()
    for key, value in uninterrupted["weights"].items():
        assert torch.equal(got["weights"][key], value), key
    assert got["log"] == uninterrupted["log"]  # every step's loss, logged once
    assert got["metrics"] == uninterrupted["metrics"]
    assert got["status"] == {"pretrain": "ok", "linear": "ok"}
    assert not list(run.rglob("*.tmp")), "resume removes what the killed writes left"


@pytest.mark.slow
def test_divergence_stops_with_the_step_keeps_a_good_checkpoint_and_records_the_failure(tmp_path, cache):
    # Warmup from a sane lr to an absurd one: step 1's update blows the weights up, so the
    # loss of step 2 is not finite (schedules read at the step itself, so step 0 uses start_lr).
    proc = bench(
        tmp_path,
        cache,
        "run_dir=run",
        "pretrain.start_lr=1e-3",
        "pretrain.lr=1e35",
        "pretrain.checkpoint_every=1",
        "pretrain.schedule_offset=0",
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "DivergenceError: pretraining loss is nan at step 2" in errors[0], proc.stderr
    run = tmp_path / "run"
    record = json.loads((run / "records" / "pretrain.json").read_text())
    assert record["status"] == "failed" and record["metrics"] == {}
    assert "at step 2" in record["error"] and "(step 1)" in record["error"]
    assert not (run / "records" / "linear.json").exists()
    state = ckpt.load(run / "checkpoints" / "last.pt")
    assert state["step"] == 1
    assert all(torch.isfinite(w).all() for w in state["method"]["weights"].values() if w.is_floating_point())


def test_non_finite_weights_are_never_checkpointed(tmp_path, cache):
    # A weight that overflowed (here set by hand: AdamW refuses an lr large enough to overflow
    # in one step, and any later step's loss would catch it first) must not reach a checkpoint.
    from omegaconf import OmegaConf

    from benchmark.config import load_config
    from benchmark.core.data import resolve_data
    from benchmark.core.errors import DivergenceError
    from benchmark.pretrain import pretrain
    from methods import build_method

    cfg = load_config([*FAST, "data.num_train=8", "pretrain.epochs=1"])
    config = OmegaConf.to_container(cfg, resolve=True)
    method = build_method("ijepa", config["model"], config["method"], 32)
    with torch.no_grad():
        method.encoder.norm.weight[0] = float("inf")
    with pytest.raises(DivergenceError, match=r"weight encoder.norm.weight is not finite after step 0; no checkpoint"):
        pretrain(
            method,
            resolve_data(cfg.data, cache),
            cfg.pretrain,
            0,
            torch.device("cpu"),
            tmp_path / "checkpoints",
            config,
            show_progress=False,
            max_steps=0,
        )
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault, signal_name, step", [("step:5", "TERM", 5), ("step:2", "KILL", 0)])
def test_stopped_or_killed_then_resumed_logs_every_step_once(tmp_path, cache, uninterrupted, fault, signal_name, step):
    """SIGTERM writes a checkpoint at the step it arrives and stops; a kill before the first
    checkpoint leaves none. Either way the resumed run's train log and results equal the
    uninterrupted run's."""
    stopped = bench(tmp_path, cache, "run_dir=run", fault=fault, fault_signal=signal_name)
    run = tmp_path / "run"
    if signal_name == "TERM":
        assert stopped.returncode == 1 and f"stopped: pretraining stopped on request at step {step}" in stopped.stderr
        assert f"resume with run_dir={run} resume=true" in stopped.stderr
        assert ckpt.load(run / "checkpoints" / "last.pt")["step"] == step
    else:
        assert stopped.returncode == -signal.SIGKILL and not (run / "checkpoints" / "last.pt").exists()
    assert not (run / "records" / "pretrain.json").exists()  # stopped, not failed
    resumed = bench(tmp_path, cache, "run_dir=run", "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    again = outcome(run)
    steps = [json.loads(line)["step"] for line in again["log"]]
    assert steps == sorted(set(steps)) == list(range(1, 9))  # every step logged exactly once
    assert again["log"] == uninterrupted["log"] and again["metrics"] == uninterrupted["metrics"]
