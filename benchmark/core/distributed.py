"""Data-parallel pretraining (torch.distributed DDP) across the tasks of a job.

Where the rank and world size come from, first match wins:
- torchrun (or any launcher that sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
- a submitit job on SLURM with several tasks (`launcher.tasks_per_node` x `launcher.nodes`):
  submitit's JobEnvironment gives the global rank, local rank, task count and the first host,
  which becomes the rendezvous address;
- otherwise one process, and every call below is a no-op.

What a world of N processes does (benchmark/pretrain.py): `pretrain.batch_size` stays the GLOBAL
batch (schedules and results do not depend on N); each rank builds views and masks for its
contiguous 1/N of every batch, the method runs wrapped in DistributedDataParallel (gradients
averaged across ranks during backward, weights broadcast from rank 0 at the start), the logged
loss is the mean over ranks, and only rank 0 writes checkpoints, logs and records. Evaluation
tasks run on rank 0 only, except those that declare themselves data-parallel (the streaming
linear probe): every rank runs those, before rank 0 runs the rest, and rank 0 records them. A
preemption or timeout signal is agreed across ranks at every step, so all of them stop at the
same step boundary.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()
_world = SINGLE
# Where collective calls put their tensors: NCCL needs CUDA tensors, gloo CPU ones.
_comm_device = torch.device("cpu")


def current() -> World:
    return _world


def planned_size() -> int:
    """How many ranks this process will run with (read from the environment, joins nothing)."""
    if dist.is_initialized():
        return _world.size
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return submitit.JobEnvironment().num_tasks
    return 1


def _from_environment() -> World:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        if submitit.JobEnvironment().num_tasks == 1:
            return SINGLE
        # Sets MASTER_ADDR/PORT (the port derived from the job id, the same on every task), RANK,
        # WORLD_SIZE and LOCAL_RANK for env:// rendezvous. The GPU is chosen by local rank in
        # setup(), so CUDA_VISIBLE_DEVICES is left as SLURM set it.
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return World(env.rank, env.world_size, env.local_rank)
    return SINGLE


def setup(device: torch.device, timeout_s: float = 1800) -> tuple[World, torch.device]:
    """Join the job's process group (once per process); returns the world and this rank's device."""
    global _world, _comm_device
    if not dist.is_initialized():
        world = _from_environment()
        if not world.active:
            return SINGLE, device
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=world.rank,
            world_size=world.size,
            timeout=dt.timedelta(seconds=timeout_s),
        )
        _world = world
        _comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _world, device


def shutdown() -> None:
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = SINGLE


def barrier() -> None:
    if _world.active:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's value (any picklable object) on every rank."""
    if not _world.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (a new tensor; the input is left alone)."""
    if not _world.active:
        return value.detach()
    out = value.detach().to(_comm_device, copy=True)
    dist.all_reduce(out)
    return (out / _world.size).to(value.device)


def any_rank(flag: int) -> int:
    """The largest of an integer flag over ranks (e.g. 'an interrupt was asked for')."""
    if not _world.active:
        return flag
    t = torch.tensor([flag], dtype=torch.int64, device=_comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def check_in_sync(module: torch.nn.Module, stage: str = "pretraining") -> None:
    """Raise if any rank's weights differ from rank 0's (e.g. a rank that skipped a step)."""
    if not _world.active:
        return
    with torch.no_grad():
        local = torch.stack([t.double().sum() for t in module.state_dict().values() if t.is_floating_point()]).to(
            _comm_device
        )
    ref = local.clone()
    dist.broadcast(ref, src=0)
    differ = int(not torch.equal(local, ref))
    if any_rank(differ):
        raise RuntimeError(f"rank {_world.rank}: weights differ between ranks after {stage}")


class StepModule(torch.nn.Module):
    """The method's training step as a forward pass, which DistributedDataParallel can wrap."""

    def __init__(self, method: torch.nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch: dict) -> dict:
        return self.method.training_step(batch)


def replicated(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module wrapped so that backward averages its gradients across ranks (DDP: weights
    broadcast from rank 0 first, buffers such as BatchNorm statistics from rank 0 at every
    forward), or the module itself in a single process."""
    if not _world.active:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def data_parallel(method: torch.nn.Module, device: torch.device):
    """A callable batch -> outputs that averages gradients across ranks (DDP), or the plain step."""
    if not _world.active:
        return method.training_step
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(StepModule(method), device_ids=ids)
