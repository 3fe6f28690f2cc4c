"""Data-parallel pretraining (benchmark/core/distributed.py): real processes, gloo on CPU, via torchrun.

- a batch splits over ranks into exactly the single-process batch (samples and their seeds);
- MAE on 2 ranks follows the single-process run with the same global batch (its masks are drawn
  per sample, so the split changes nothing but the order of float sums);
- IWM on 2 ranks: ranks stay in sync, rank 0 alone writes, evaluation runs once;
- a stop asked on ONE rank stops every rank at the same step, and the resumed run ends where an
  uninterrupted 2-rank run ends.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY

from benchmark.core.loading import SeededBatches

TORCHRUN = Path(sys.executable).with_name("torchrun")
RUN = TINY + ["pretrain.batch_size=8", "data.num_train=64", "tasks.linear.epochs=1", "task=linear"]


def torchrun(tmp_path, cache_dir, nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BENCH_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def bench_torchrun(tmp_path, cache_dir, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    return torchrun(tmp_path, cache_dir, nproc, "-m", "benchmark.cli", "run", *overrides)


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["method"]["weights"]


def log_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_make_up_the_single_process_batch(world_size):
    single = list(SeededBatches(40, 8, seed=3, epoch=1, start=1))
    shards = [
        list(SeededBatches(40, 8, seed=3, epoch=1, start=1, rank=r, world_size=world_size)) for r in range(world_size)
    ]
    assert all(len(s) == len(single) for s in shards)
    for b, batch in enumerate(single):
        parts = [s[b] for s in shards]
        assert all(len(p) == 8 // world_size for p in parts)
        # Same samples with the same per-sample seeds (views), in the same order...
        assert [item[:2] for p in parts for item in p] == [item[:2] for item in batch]
        # ...and a batch seed (masks) of each rank's own.
        assert len({p[0][2] for p in parts} | {batch[0][2]}) == world_size + 1
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        SeededBatches(40, 8, seed=3, epoch=1, rank=0, world_size=3)


@pytest.mark.slow
def test_mae_on_two_ranks_follows_the_single_process_run(bench, tmp_path, cache_dir):
    common = RUN + [
        "method=mae",
        "pretrain=mae_cpu",
        "pretrain.epochs=2",
        "pretrain.batch_size=8",
        "pretrain.log_every=1",
    ]
    bench("run", *common, f"run_dir={tmp_path / 'one'}", check=0)
    proc = bench_torchrun(tmp_path, cache_dir, 2, *common, f"run_dir={tmp_path / 'two'}")
    assert proc.stdout.count("run folder:") == 1  # rank 0 reports, rank 1 stays quiet
    one, two = log_losses(tmp_path / "one"), log_losses(tmp_path / "two")
    assert len(one) == len(two) == 16  # 64 images / global batch 8 x 2 epochs, one log line each
    assert two == pytest.approx(one, rel=1e-4)
    assert two[-1] < two[0] - 0.01  # it trained
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 2e-3
    # One set of records, all from rank 0.
    records = sorted(p.name for p in (tmp_path / "two" / "records").glob("*.json"))
    assert records == ["linear.json", "pretrain.json"]
    pre = json.loads((tmp_path / "two" / "records" / "pretrain.json").read_text())
    assert pre["metrics"]["steps"] == 16


@pytest.mark.slow
def test_a_stop_asked_on_one_rank_stops_both_and_resumes_to_the_uninterrupted_result(bench, tmp_path, cache_dir):
    common = RUN + ["method=iwm", "pretrain.epochs=2", "pretrain.log_every=1"]
    bench_torchrun(tmp_path, cache_dir, 2, *common, f"run_dir={tmp_path / 'twin'}")
    worker = ROOT / "tests" / "ddp_preempt_worker.py"
    torchrun(tmp_path, cache_dir, 2, str(worker), str(tmp_path / "cut" / "run"), "5", *common)
    assert json.loads((tmp_path / "cut" / "stopped.json").read_text()) == [5, 5]
    cut, twin = tmp_path / "cut" / "run", tmp_path / "twin"
    assert log_losses(cut) == log_losses(twin)
    wa, wb = weights(cut), weights(twin)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for run in (cut, twin):
        rec = json.loads((run / "records" / "pretrain.json").read_text())
        assert rec["status"] == "ok" and rec["metrics"]["steps"] == 16
        assert json.loads((run / "records" / "linear.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, cache_dir):
    env = dict(os.environ, BENCH_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "benchmark.cli",
        "run",
        *RUN,
        "method=iwm",
        "pretrain.batch_size=9",
        f"run_dir={tmp_path / 'odd'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "pretrain.batch_size=9 does not split over 2 processes" in proc.stdout + proc.stderr
    assert shutil.which(str(TORCHRUN))


@pytest.mark.slow
def test_a_two_task_submitit_local_job_is_one_data_parallel_run(bench, tmp_path):
    """launcher=submitit_local launcher.tasks_per_node=2: two processes that meet through submitit's
    job environment; rank 0 returns the records, rank 1 trains beside it and returns none."""
    import pickle

    proc = bench(
        "run",
        *RUN,
        "method=mae",
        "pretrain=mae_cpu",
        "pretrain.log_every=1",
        "launcher=submitit_local",
        "launcher.tasks_per_node=2",
        f"run_dir={tmp_path / 'run'}",
        check=0,
    )
    assert "linear" in proc.stdout
    results = sorted((tmp_path / ".submitit" / "run").glob("*_result.pkl"))
    assert [p.name.split("_")[1] for p in results] == ["0", "1"]
    outcomes = [pickle.loads(p.read_bytes()) for p in results]
    assert [o[0] for o in outcomes] == ["success", "success"]
    assert [len(o[1]) for o in outcomes] == [2, 0]  # pretrain + linear records, from rank 0 only
    assert len(log_losses(tmp_path / "run")) == 8  # 64 images / global batch 8: each step logged once


@pytest.mark.slow
def test_the_streaming_linear_probe_runs_on_every_rank_and_is_recorded_once(bench, tmp_path, cache_dir):
    """The paper's linear probe is data-parallel: both ranks stream their half of every batch
    through the frozen encoder, gradients are averaged, rank 0 evaluates and records."""
    common = TINY + [
        "method=iwm",
        "pretrain.epochs=0",
        "task=linear",
        "tasks.linear.protocol=streaming",
        "tasks.linear.epochs=4",
        "tasks.linear.batch_size=16",
        "tasks.linear.warmup_epochs=1",
        "tasks.linear.blr=40",
        "tasks.linear.precision=fp32",
    ]
    bench("run", *common, f"run_dir={tmp_path / 'one'}", check=0)
    proc = bench_torchrun(tmp_path, cache_dir, 2, *common, f"run_dir={tmp_path / 'two'}")
    assert proc.stderr.count("task linear") == 1  # rank 1 runs it quietly
    one, two = (json.loads((tmp_path / r / "records" / "linear.json").read_text()) for r in ("one", "two"))
    assert one["status"] == two["status"] == "ok"
    assert (one["metrics"]["ranks"], two["metrics"]["ranks"]) == (1, 2)
    # The same global schedule (96 images / 16 per step x 4 epochs), the same val set.
    assert one["metrics"]["steps"] == two["metrics"]["steps"] == 24
    assert one["metrics"]["val_samples"] == two["metrics"]["val_samples"] == 48
    # Each rank normalises its own 8 images (BatchNorm per rank, as the official probe under
    # DDP), so the runs differ a little, not more: the mean training loss within 10 %.
    mean_one, mean_two = (sum(r["metrics"]["loss_curve"]) / 20 for r in (one, two))
    assert mean_two == pytest.approx(mean_one, rel=0.1)
    assert sorted(p.name for p in (tmp_path / "two" / "records").glob("*.json")) == ["linear.json", "pretrain.json"]
