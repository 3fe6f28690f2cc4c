"""Losses and target-side maths as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_targets(h: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the feature dimension without affine parameters (JEPA targets)."""
    return F.layer_norm(h, (h.size(-1),))


LATENT_LOSSES = ("smooth_l1", "l2", "l1")


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


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], row-major patches, each flattened (row, column, channel).

    The (row, column, channel) order is the official MAE one, so a released decoder_pred's
    outputs line up with these targets. Built through channels-last: moving the 3 channels
    innermost in one pass over the image, then whole pixel rows (p*C values) into patches, beats
    one permute with a 3-wide inner stride (same values).
    """
    b, c, h, w = images.shape
    p = patch_size
    x = images.permute(0, 2, 3, 1).reshape(b, h // p, p, w // p, p * c)
    return x.permute(0, 1, 3, 2, 4).reshape(b, (h // p) * (w // p), p * p * c)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix_loss targets: each patch minus its mean, over sqrt(unbiased variance + eps)."""
    var, mean = torch.var_mean(patches, dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_pixel_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MAE's loss on the removed patches only: per-patch MSE, averaged over patches.

    Both are [B, K, P] at the removed positions; every sample removes the same K patches,
    so this equals the official sum(loss * mask) / sum(mask).
    """
    return ((pred.float() - target.float()) ** 2).mean(dim=-1).mean()
