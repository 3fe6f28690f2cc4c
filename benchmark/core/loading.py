"""The deterministic loading pipeline: seeded batches, per-sample seeded views, loader workers.

Every random choice of the data path (sample order, crops, masks) is seeded from
(seed, epoch, batch index), never from worker-global state: a run gives the same batches with
any number of workers, and a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.queues
import os
import random
import signal
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils import signal_handling as torch_signals  # worker pids torch watches

from benchmark.core.errors import DataError
from benchmark.core.seeding import derive_seed
from benchmark.core.transforms import eval_transform


class SeededBatches(Sampler):
    """Batches of (index, sample_seed, batch_seed) for one epoch, starting at batch `start`.

    With `world_size` > 1 each rank gets its contiguous 1/world_size of every batch: the samples,
    and their seeds, are the ones a single process would see at those positions, so the union
    over ranks is the single-process batch; the batch seed (masks) is drawn per rank.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split over {world_size} processes")
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.start, self.shuffle, self.drop_last = start, shuffle, drop_last
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        full = self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)
        return max(0, full - self.start)

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        share = self.batch_size // self.world_size
        for b in range(self.start, self.start + len(self)):
            batch_seed = derive_seed(self.seed, self.epoch, b)
            shard_seed = batch_seed if self.world_size == 1 else derive_seed(batch_seed, self.rank)
            first = b * self.batch_size + self.rank * share
            chunk = order[first : min(first + share, (b + 1) * self.batch_size)]
            yield [(i, derive_seed(batch_seed, self.rank * share + j), shard_seed) for j, i in enumerate(chunk)]


class Transformed(Dataset):
    """Applies a random transform under a per-sample seed; items are (view, label, batch_seed).

    Every global RNG a transform may draw from is seeded and restored: torch's (torchvision),
    Python's and numpy's (timm's RandAugment and random erasing). A loader fetches a batch at once
    (`__getitems__`): the states are saved before its first sample and restored after its last,
    and each sample reseeds all three, so a view is the same as when fetched alone.
    """

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int, int]]) -> list:
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                return [self._view(*key) for key in keys]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def _view(self, index: int, sample_seed: int, batch_seed: int):
        image, label = self.base[index]
        # The CPU generator alone (the transforms' and all fork_rng restores): torch.manual_seed also
        # seeds every GPU generator, which before CUDA starts records a stack trace per call (a
        # fifth of a view's cost, `bench perf --data-path`).
        torch.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        return self.transform(image), label, batch_seed


def train_loader(
    dataset: Dataset,
    transform: Callable,
    collate: Callable,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """This rank's share of each of the epoch's batches (batch_size is the global batch)."""
    batches = SeededBatches(len(dataset), batch_size, seed, epoch, start, rank=rank, world_size=world_size)
    # Workers build views and masks while the step runs; pinned pages make the copy to a GPU async.
    return make_loader(Transformed(dataset, transform), batches, collate, workers, pin_memory)


# How much lower a loader worker's scheduling priority is than the training process's (nice
# increment): with no spare core, a worker at equal priority preempts the step's OpenMP threads,
# which then wait on each other at every barrier (measured in docs/performance.md).
WORKER_NICENESS = 10


# Set by the main process when it exits: from then on a worker obeys SIGTERM (see below).
_CLOSING = None


# Why a worker stopped, written by the worker, read by the training process (see _batch_not_sent).
_WORKER_FAILURE = None


def _closing_event():
    """The process-shared flags, made once in the main process before any worker is forked."""
    global _CLOSING, _WORKER_FAILURE
    if _CLOSING is None:
        _CLOSING = multiprocessing.get_context().Event()
        _WORKER_FAILURE = multiprocessing.get_context().Array("c", 512, lock=False)
        atexit.register(_CLOSING.set)  # runs before multiprocessing's own exit hook terminates workers
    return _CLOSING


_SCHEDULER_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}


def _on_sigterm(_signum, _frame) -> None:
    if _CLOSING is not None and _CLOSING.is_set():
        os._exit(0)


def init_loader_worker(_worker_id: int) -> None:
    """Every DataLoader worker: lower priority than the training process, and outlive SIGTERM
    and the SLURM preemption/timeout signals while the main process runs.

    SLURM signals every process of a job, loader workers included; a worker killed that way
    fails the main process's next batch before it can write its preemption checkpoint. The main
    process handles these signals (slurm/jobs.py). Once the main process exits (a finished run,
    or one stopped by an error while a worker was still busy) the worker obeys SIGTERM again, so
    the exit never waits on it; Ctrl-C (SIGINT) stops everything at any time.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    # Blocked since the fork (Loader.__iter__); one that arrived meanwhile is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SCHEDULER_SIGNALS)
    os.nice(WORKER_NICENESS)
    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(_batch_not_sent)


def _batch_not_sent(error: Exception, _obj) -> None:
    """A worker's queue could not send a built batch (its shared-memory copy hit the file size
    limit, `ulimit -f`, or /dev/shm is full). Python's queue would print the error and drop the
    batch, and the training process would wait for it forever; the worker leaves its reason for
    the training process and exits instead, so the loader fails at once (Loader names the cause)."""
    text = " ".join(str(error).split())
    if "File too large" in text:
        text += " (the file size limit, ulimit -f)"
    elif "No space left" in text:
        text += " (/dev/shm is full)"
    if _WORKER_FAILURE is not None:
        _WORKER_FAILURE.value = text.encode()[:511]
    print(f"loader worker: cannot hand a batch to the training process: {text}", file=sys.stderr, flush=True)
    os._exit(1)


def stop_workers(loader: DataLoader) -> None:
    """Stop the workers of a Loader's current pass now, dropping the batches they are building:
    for a run that stops (SIGTERM, preemption) or fails mid-epoch. torch's own shutdown asks each
    worker to finish its batch and waits up to 5 s per worker before killing it; an IWM batch (two
    photometric views per image) can take that long, so the process would linger."""
    batches = getattr(loader, "current", None)
    workers = getattr(batches, "_workers", None)
    if not workers or getattr(batches, "_shutdown", True):
        return
    if hasattr(batches, "_pin_memory_thread"):
        # Its shutdown writes to the result queue, whose lock a killed worker could hold: torch's
        # own, patient shutdown.
        batches._shutdown_workers()
        return
    batches._workers_done_event.set()
    if batches._worker_pids_set:  # their deaths are expected: torch's SIGCHLD check must not fire
        torch_signals._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join()
    batches._shutdown_workers()


class Loader(DataLoader):
    """A DataLoader whose failure when a worker stopped says why the worker stopped."""

    def __iter__(self):
        # Workers are forked here. Until a worker has run init_loader_worker it has torch's SIGTERM
        # handler, which dies on a signal from any process but its parent; a scheduler signalling
        # the whole job in that moment would fail the next batch. So the signals stay blocked
        # across the fork, and each worker unblocks them once its own handlers are in place.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SCHEDULER_SIGNALS)
        try:
            batches = self.current = super().__iter__()  # stop_workers reaches the workers here
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as exc:
                reason = _WORKER_FAILURE.value.decode() if _WORKER_FAILURE is not None else ""
                if not reason or "exited unexpectedly" not in str(exc):
                    raise
                raise DataError(
                    f"a data loader worker could not hand its batch to the training process: {reason}; "
                    f"fix that, or run with workers=0 (batches built in the training process)"
                ) from None
            yield batch


def make_loader(
    dataset: Dataset, batch_sampler, collate: Callable, workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """The one DataLoader construction every loop uses (workers set up by init_loader_worker)."""
    if workers:
        _closing_event()
    return Loader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=init_loader_worker if workers else None,
    )


def eval_loader(
    dataset: Dataset, image_size: int, batch_size: int, workers: int = 0, interpolation: str = "bicubic"
) -> DataLoader:
    """Deterministic resize + centre crop, in order, every sample kept."""
    batches = SeededBatches(len(dataset), batch_size, 0, 0, shuffle=False, drop_last=False)
    transform = eval_transform(image_size, interpolation)
    return make_loader(Transformed(dataset, transform), batches, stack_views, workers)


def stack_views(items: Sequence) -> dict:
    views, labels, _ = zip(*items)
    return {"images": torch.stack(views), "labels": torch.tensor(labels)}
