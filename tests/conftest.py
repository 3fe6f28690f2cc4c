import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A tiny but complete configuration: real generator, real model code, seconds per run.
TINY = [
    "model=vit_micro",
    "model.depth=2",
    "method.predictor.depth=1",
    "method.predictor.width=48",
    "data.num_train=96",
    "data.num_val=48",
    "pretrain.epochs=1",
    "pretrain.batch_size=16",
    "pretrain.checkpoint_every=0",
    "tasks.linear.epochs=3",
    "progress=false",
]
TINY_MODEL = [o for o in TINY if not o.startswith("data.")]


@pytest.fixture
def cache_dir(tmp_path_factory):
    """One generated dataset cache shared by the tests of a session."""
    return tmp_path_factory.getbasetemp() / "cache"


@pytest.fixture
def bench(tmp_path, cache_dir):
    """Run the installed `bench` entry point in a subprocess, as a user would."""

    def run(*args, check=None):
        env = dict(os.environ, BENCH_CACHE=str(cache_dir))
        proc = subprocess.run(
            [sys.executable, "-m", "benchmark.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        if check is not None:
            assert proc.returncode == check, proc.stdout + proc.stderr
        return proc

    return run
