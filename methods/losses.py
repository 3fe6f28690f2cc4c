"""Losses and target-side maths as pure functions."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_targets(h: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the feature dimension without affine parameters (JEPA targets)."""
    return F.layer_norm(h, (h.size(-1),))


def latent_regression(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Mean regression loss between predicted and target latents.

    smooth_l1 is the official I-JEPA loss (beta 1), l2 the mean squared error used by IWM,
    l1 the mean absolute error.
    """
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    raise ValueError(f"unknown latent loss {kind!r} (choose smooth_l1, l2 or l1)")


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, in place."""
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, online, alpha=1.0 - momentum)
