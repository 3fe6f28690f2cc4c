"""Label smoothing, mixup and cutmix (the MAE finetuning recipe's regularisers).

Mixup and cutmix are timm's `Mixup` in batch mode, the one MAE's finetuning calls. They work on
any [B, C, H, W] input: images, or a token grid [B, D, h, w] when a frozen encoder's tokens are
the input (cutmix then swaps whole patches). timm draws from numpy's global RNG: each call runs
under a numpy state seeded from the generator passed in, so a seeded run mixes the same way
every time and nothing outside is disturbed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot rows with `smoothing` of the mass spread evenly over all classes."""
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def mix(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    smoothing: float,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float,
    switch_prob: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, soft targets): label smoothing, and with probability `prob` mixup or cutmix of the
    batch with its flipped self (cutmix with probability `switch_prob` when both are on; the
    targets follow the area actually pasted). Alphas of 0 switch a method off; both off leaves
    the inputs as they are."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, soft_targets(labels, num_classes, smoothing)
    mixer = Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        mode="batch",
        label_smoothing=smoothing,
        num_classes=num_classes,
    )
    outer = np.random.get_state()
    np.random.seed(int(torch.randint(2**31, (1,), generator=gen)))
    try:
        # timm mixes in place: never into a tensor the caller keeps (a token cache).
        return mixer(x.clone(), labels)
    finally:
        np.random.set_state(outer)
