"""Timings inside one process: the machine's matmul ceiling, and one case's step and loop."""

from __future__ import annotations

import math
import resource
import time

import torch

from benchmark.perf.cases import PRECISIONS
from benchmark.perf.common import _method_and_data, _sync, training_step


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best GFLOP/s of a large square matmul: what the machine can do at best."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_training_step(overrides: list[str], steps: int, warmup: int, device: str, threads: int | None) -> dict:
    """Warm-up then timed steps of the real training step on the real data path (one case)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmark.config import load_config
    from benchmark.core.layers import to_device
    from benchmark.core.loading import train_loader
    from benchmark.step import forward_loss

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cfg = load_config(overrides)
    pcfg = cfg.pretrain
    method, dataset = _method_and_data(cfg, dev)
    train, opt = training_step(cfg, method, len(dataset), dev)
    total = warmup + steps

    def loader(workers: int, epoch: int):
        return train_loader(
            dataset,
            method.train_transform(),
            method.collate,
            pcfg.batch_size,
            cfg.seed,
            epoch,
            workers=workers,
            pin_memory=dev.type == "cuda",
        )

    # Batches for the step alone (a second epoch: other views and masks than the loop's), built
    # first in this process; what one costs is the data-path figure.
    start = time.perf_counter()
    prebuilt = [to_device(b, dev) for _, b in zip(range(steps), loader(0, 1))]
    data_seconds = (time.perf_counter() - start) / len(prebuilt)

    # The training loop as pretraining runs it: warm-up, then timed steps, fed by the default
    # loader workers (which share the CPU with the step); how long each step waited for its batch.
    loop_seconds, waits, losses = [], [], []
    feed = iter(loader(cfg.workers, 0))
    for i in range(total):
        start = time.perf_counter()
        batch = to_device(next(feed), dev)
        _sync(dev)
        ready = time.perf_counter()
        value = train(i, batch)
        if i >= warmup:
            loop_seconds.append(time.perf_counter() - ready)
            waits.append(ready - start)
            losses.append(value)
    del feed
    # The step alone, as the official code's figures time it: batches already in memory, nothing
    # else running. A first untimed pass over them builds the kernels of their mask shapes (a
    # bf16 product builds one the first time it meets a shape), so that a timing does not depend
    # on which shapes the warm-up happened to meet; the second pass is timed.
    seconds = []
    for j, batch in enumerate(prebuilt + prebuilt):
        start = time.perf_counter()
        losses.append(train(total + j, batch))
        if j >= len(prebuilt):
            seconds.append(time.perf_counter() - start)
    memory = peak_memory_mib(dev)

    # FLOPs of exactly the timed batches (forward, loss, backward), counted eagerly.
    flops = []
    for batch in prebuilt:
        with FlopCounterMode(display=False) as counter:
            forward_loss(method.training_step, batch, dev, bool(pcfg.bf16)).backward()
        opt.zero_grad(set_to_none=True)
        flops.append(counter.get_total_flops())
    return {
        "seconds": seconds,
        "loop_seconds": loop_seconds,
        "waits": waits,
        "losses": losses,
        "flops": flops,
        "data_seconds_per_batch": data_seconds,
        "peak_memory_mib": memory,
        "batch_size": int(pcfg.batch_size),
        "workers": int(cfg.workers),
        "threads": torch.get_num_threads(),
    }


def measure_ceiling(device: str, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    size = 8192 if dev.type == "cuda" else 2048
    return {p: matmul_ceiling(dev, torch.float32 if p == "fp32" else torch.bfloat16, size) for p in PRECISIONS}
