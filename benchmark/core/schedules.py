"""Per-iteration schedules as pure functions of the step (so a resumed run needs only the step)."""

from __future__ import annotations

import math


def warmup_cosine(
    step: int, total: int, warmup: int, start: float, peak: float, final: float, reach_peak: bool = False
) -> float:
    """Linear warmup start -> peak over `warmup` steps, then cosine peak -> final at `total`.

    The warmup's last step is one short of the peak (I-JEPA, MAE: the cosine's first step is the
    peak), or with `reach_peak` the peak itself (DINO's np.linspace, both ends included).
    """
    if step < warmup:
        if reach_peak:
            return start if warmup == 1 else start + (peak - start) * step / (warmup - 1)
        return start + (peak - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total: int, start: float, final: float) -> float:
    """Cosine from start (step 0) to final (step `total`), flat after."""
    progress = min(1.0, step / max(1, total))
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(step: int, total: int, start: float, final: float) -> float:
    """Straight line from start (step 0) to final (step `total`), flat after."""
    return start + (final - start) * min(1.0, step / max(1, total))
