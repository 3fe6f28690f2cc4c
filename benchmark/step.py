"""One optimisation step of any method: what the pretraining loop runs and `bench perf` times.

Split in two so the loop can stop on a non-finite loss before it touches the weights:
`forward_loss` (forward and loss under optional bf16 autocast, optionally through
torch.compile) and `update` (backward, the method's clipping, AdamW, its post-step update).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmark.core import distributed
from methods.base import Method


def make_optimizer(method: Method, cfg) -> torch.optim.AdamW:
    """AdamW over the method's groups; fused=True runs one kernel over all parameters.

    The fused kernel computes the same update as the per-parameter loop (equal up to float
    rounding, tests/test_perf.py) with far fewer small kernel launches.
    """
    return torch.optim.AdamW(
        method.param_groups(), lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps, fused=bool(cfg.fused_adamw)
    )


def step_function(method: Method, compile: bool, device: torch.device | None = None) -> Callable[[dict], dict]:
    """method.training_step (under DDP when the process is one rank of several), or its
    torch.compile graph (dynamic: mask sizes vary per batch)."""
    step = distributed.data_parallel(method, device or torch.device("cpu"))
    if not compile:
        return step
    return torch.compile(step, dynamic=True)


def forward_loss(step: Callable[[dict], dict], batch: dict, device: torch.device, bf16: bool) -> torch.Tensor:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        return step(batch)["loss"]


def update(method: Method, opt: torch.optim.Optimizer, loss: torch.Tensor, clip_grad: float, progress: float) -> None:
    loss.backward()
    method.prepare_gradients(clip_grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    method.after_step(progress)
