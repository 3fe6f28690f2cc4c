"""Per-iteration schedules as pure functions of the step (so a resumed run needs only the step)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, start: float, peak: float, final: float) -> float:
    """Linear warmup start -> peak over `warmup` steps, then cosine peak -> final at `total`."""
    if step < warmup:
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
