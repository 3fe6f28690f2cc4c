"""Thread pools sized to what a process was given, not to the node."""

import os

import pytest
import torch

from benchmark.core import threads
from benchmark.core.loading import make_loader


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    return monkeypatch


def test_thread_count_follows_the_allocation_in_order(clean_env):
    assert threads.thread_count() == (4, "affinity mask")
    clean_env.setenv("SLURM_CPUS_PER_TASK", "1")
    assert threads.thread_count() == (1, "SLURM_CPUS_PER_TASK")
    clean_env.setenv("SLURM_CPUS_PER_TASK", "8")  # more than this process may run on: the mask wins
    assert threads.thread_count() == (4, "affinity mask")
    assert threads.thread_count(2) == (2, "threads")  # the run's setting (a launcher's cpus_per_task)
    clean_env.setenv("OMP_NUM_THREADS", "3")  # the user's explicit choice wins over everything
    assert threads.thread_count(2) == (3, "OMP_NUM_THREADS")
    clean_env.setenv("OMP_NUM_THREADS", "")
    clean_env.setenv("SLURM_CPUS_PER_TASK", "junk")
    assert threads.thread_count() == (4, "affinity mask")


def test_use_threads_sizes_torch_and_the_records_say_so(clean_env):
    before = torch.get_num_threads()
    try:
        clean_env.setenv("SLURM_CPUS_PER_TASK", "1")
        assert threads.use_threads(None) == (1, "SLURM_CPUS_PER_TASK")
        assert torch.get_num_threads() == 1
        assert threads.current() == {"threads": 1, "threads_from": "SLURM_CPUS_PER_TASK"}
    finally:
        torch.set_num_threads(before)


class _ThreadsSeen(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.get_num_threads()


def test_a_loader_worker_runs_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = list(make_loader(_ThreadsSeen(), [[0], [1]], lambda items: items[0], workers=1))
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1]
