"""Label smoothing, mixup and cutmix as pure functions (the MAE finetuning recipe's regularisers).

They work on any [B, C, H, W] input: images, or a token grid [B, D, h, w] when a frozen
encoder's tokens are the input (cutmix then swaps whole patches). Randomness comes only from
the generator passed in, so a seeded run mixes the same way every time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot rows with `smoothing` of the mass spread evenly over all classes."""
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cutmix_box(height: int, width: int, lam: float, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box covering about 1 - lam of the area, centred uniformly,
    clipped at the borders."""
    cut = math.sqrt(1.0 - lam)
    h, w = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (1,), generator=gen))
    cx = int(torch.randint(width, (1,), generator=gen))
    return max(cy - h // 2, 0), min(cy + h // 2, height), max(cx - w // 2, 0), min(cx + w // 2, width)


def mix(
    x: torch.Tensor,
    targets: torch.Tensor,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float,
    switch_prob: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix of a batch with its flipped self (one draw per batch, as in MAE/timm).

    With probability `prob` the batch is mixed: by cutmix when only cutmix is on, or with
    probability `switch_prob` when both are; the target weights follow the pixels actually
    swapped. Alphas of 0 switch a method off.
    """
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or float(torch.rand(1, generator=gen)) >= prob:
        return x, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand(1, generator=gen)) < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = beta_sample(alpha, gen)
    flipped = x.flip(0)
    if use_cutmix:
        top, bottom, left, right = cutmix_box(x.size(-2), x.size(-1), lam, gen)
        x = x.clone()
        x[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (x.size(-2) * x.size(-1))
    else:
        x = lam * x + (1.0 - lam) * flipped
    return x, lam * targets + (1.0 - lam) * targets.flip(0)


def beta_sample(alpha: float, gen: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha)."""
    # torch.distributions takes no generator: sample under the global RNG seeded from `gen`.
    seed = int(torch.randint(2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
