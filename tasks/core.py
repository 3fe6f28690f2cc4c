"""The protocol core: what every supervised stage (finetuning, multitask tuning, ADE20k) shares.

One training loop (`train`), one way to copy a method for training (`working_copy`), one way
to make a copied network trainable (`train_like`), stochastic depth (`set_drop_path`). The
parameter-group and layer-decay rules are benchmark.core.optim's, the random-predictor control is
the method contract's `reset_predictor`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models.vision_transformer import Block

from benchmark.core.errors import DivergenceError
from benchmark.core.progress import progress_bar
from methods.base import Method

# What each draw of a protocol is seeded with: derive_seed(the protocol's seed, X). Named once so
# that no two draws of one protocol share a seed by accident.
MIX_SEED, RANDOM_PREDICTOR_SEED, HEAD_SEED, TRAIN_POOL_SEED, GLOBAL_RNG_SEED = 1, 2, 3, 4, 5


def working_copy(method: Method, trained: list[nn.Module]) -> Method:
    """A copy of the method in which the `trained` modules are duplicated and everything else
    among encoder / target encoder / predictor is shared with the original (frozen, never copied):
    training never changes the weights later tasks evaluate."""
    shared = [
        m
        for m in (method.encoder, method.target_encoder, method.predictor)
        if m is not None and all(m is not t for t in trained)
    ]
    memo = {}
    for m in shared:
        memo[id(m)] = m
        for t in (*m.parameters(), *m.buffers()):
            memo[id(t)] = t
    return copy.deepcopy(method, memo)


def train_like(module: nn.Module, reference: nn.Module) -> None:
    """Make `module` trainable where `reference` (a network of the same architecture) is: e.g. a
    target encoder, frozen as a whole, trains like its online twin; fixed position tables stay
    fixed either way."""
    trains = {name: p.requires_grad for name, p in reference.named_parameters()}
    for name, p in module.named_parameters():
        p.requires_grad_(trains.get(name, True))


def set_drop_path(module: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to `rate` over the module's transformer blocks."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    rates = torch.linspace(0, rate, len(blocks)).tolist() if blocks else []
    for block, r in zip(blocks, rates):
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()


# Mixed precision of a training stage: bf16 autocast, fp16 autocast with a dynamic loss scale
# (the official MAE recipes' torch.cuda.amp), or none.
PRECISIONS = ("bf16", "fp16", "fp32")


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision (a no-op for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def train(
    groups: list[dict],
    batches: Iterable,
    total_steps: int,
    lr_at: Callable[[int], float],
    loss_fn: Callable[[object], torch.Tensor],
    *,
    betas,
    clip_grad: float,
    device: torch.device,
    precision: str,
    label: str,
    show_progress: bool = False,
    optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
    wd_at: Callable[[int], float] | None = None,
) -> list[float]:
    """AdamW (or `optimizer(groups)`) over `groups` for up to `total_steps` batches; returns the
    loss of every step.

    Per step: every group's lr is lr_at(step) * its lr_scale, with `wd_at` every decayed group's
    (apply_wd) weight decay is wd_at(step), the loss is computed under the
    precision's autocast, a non-finite loss stops the stage with DivergenceError naming the step,
    then backward (through a dynamic loss scale under fp16), optional gradient clipping and the
    update.
    """
    opt = optimizer(groups) if optimizer is not None else torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for g in groups for p in g["params"]]
    losses: list[float] = []
    with progress_bar(label, total_steps, enabled=show_progress) as bar:
        for batch in batches:
            step = len(losses)
            if step >= total_steps:
                break
            lr = lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
                if wd_at is not None and group.get("apply_wd"):
                    group["weight_decay"] = wd_at(step)
            with autocast(device, precision):
                loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise DivergenceError(f"{label}: training loss is {loss.item()} at step {step} (lower the lr?)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
            bar.advance(loss=losses[-1])
    return losses


# A training stage has converged (its loss has flattened) when the mean loss of its last fifth of
# steps is below the fifth before it by at most FLAT_SHARE of the stage's whole decrease (first
# fifth to last), or by at most FLAT_FLOOR of its first loss when it barely moved at all.
FLAT_SHARE, FLAT_FLOOR = 0.1, 0.01
CONVERGENCE_RULE = (
    f"last fifth of the steps lowers the mean loss by at most {FLAT_SHARE:g} of the stage's total "
    f"decrease (or {FLAT_FLOOR:g} of the first loss)"
)
CURVE_POINTS = 20


def loss_curve(losses: list[float], points: int = CURVE_POINTS) -> list[float]:
    """The losses as the means of up to `points` equal consecutive windows (the record's curve)."""
    if not losses:
        return []
    return [float(np.mean(w)) for w in np.array_split(np.asarray(losses, dtype=float), min(points, len(losses)))]


def converged(losses: list[float]) -> bool | None:
    """Whether the loss has flattened by CONVERGENCE_RULE; None with fewer than 5 steps."""
    if len(losses) < 5:
        return None
    fifths = [float(np.mean(w)) for w in np.array_split(np.asarray(losses, dtype=float), 5)]
    first, before, last = fifths[0], fifths[3], fifths[4]
    return before - last <= max(FLAT_SHARE * (first - last), FLAT_FLOOR * abs(first))


def loss_summary(losses: list[float], tail: int) -> dict:
    """Steps, first loss, the mean of the last `tail` losses (a stage's last epoch), the loss curve
    and whether the stage converged (CONVERGENCE_RULE)."""
    last = losses[-max(1, tail) :]
    return {
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(last) / len(last) if last else None,
        "loss_curve": loss_curve(losses),
        "converged": converged(losses),
    }
