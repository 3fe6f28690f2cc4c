"""Masking: I-JEPA's multi-block masks and MAE's per-sample random masks (at the end).

I-JEPA, per batch: one target-block size and one context-block size are drawn; per image:
`num_targets` target blocks at random positions, then one context block with every target patch
removed from it. Index lists are cut to the batch minimum so they stack into tensors.

Two edge modes:
- "official" reproduces the released collator bit for bit in distribution: block sides are capped
  at grid-1 and positions drawn with an exclusive upper bound, so the last patch row and column
  are never inside any block (at 224/16 the 13x13 context block always sits top-left), and one
  uniform draw sets both the scale and the aspect ratio of a block.
- "corrected" lets a block touch every row and column, allows full-grid blocks, and draws scale
  and aspect ratio independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

EDGE_MODES = ("official", "corrected")


@dataclass(frozen=True)
class MaskConfig:
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False
    edge: str = "official"
    # Attempts at one block position before the official collator relaxes its constraints.
    attempts: int = 20

    def __post_init__(self):
        """The one check of the `method.mask` settings (the config check calls it too)."""
        if self.edge not in EDGE_MODES:
            raise ValueError(f"method.mask.edge must be one of {', '.join(EDGE_MODES)}, got {self.edge!r}")
        for name, high in (
            ("target_scale", 1),
            ("context_scale", 1),
            ("target_aspect", None),
            ("context_aspect", None),
        ):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(v) for v in value)):
                raise ValueError(f"method.mask.{name} must be a pair [min, max] of numbers, got {value!r}")
            lo, hi = value
            if not (0 < lo <= hi and (high is None or hi <= high)):
                raise ValueError(
                    f"method.mask.{name} must satisfy 0 < min <= max{'' if high is None else f' <= {high}'}"
                    f", got {list(value)}"
                )
        for name, low in (("num_targets", 1), ("min_keep", 0), ("attempts", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"method.mask.{name} must be {'> 0' if low else '>= 0'}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def block_size(
    gen: torch.Generator, grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float], edge: str
) -> tuple[int, int]:
    """(height, width) in patches of a block covering ~scale of the grid at the given aspect."""
    u = torch.rand(1, generator=gen).item()
    v = u if edge == "official" else torch.rand(1, generator=gen).item()
    return block_size_from_draws(u, v, grid, scale, aspect, edge)


def block_size_from_draws(
    u: float, v: float, grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float], edge: str
) -> tuple[int, int]:
    H, W = grid
    s = scale[0] + u * (scale[1] - scale[0])
    ar = aspect[0] + v * (aspect[1] - aspect[0])
    area = int(H * W * s)
    h = int(round(math.sqrt(area * ar)))
    w = int(round(math.sqrt(area / ar)))
    cap_h, cap_w = (H - 1, W - 1) if edge == "official" else (H, W)
    return max(1, min(h, cap_h)), max(1, min(w, cap_w))


class MultiBlockMasker:
    """Draws context and target index sets on a patch grid; deterministic given a generator."""

    def __init__(self, grid: int | tuple[int, int], cfg: MaskConfig):
        self.grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.cfg = cfg
        H, W = self.grid
        if cfg.min_keep >= H * W:
            raise ValueError(f"method.mask.min_keep={cfg.min_keep} leaves nothing to predict on a {H}x{W} grid")
        # Every block size the draws can produce must be able to keep more than min_keep patches,
        # or placing it would never end: check a fine grid of the uniform draws up front.
        draws = [i / 20 for i in range(21)]
        for scale, aspect, what in (
            (cfg.target_scale, cfg.target_aspect, "target"),
            (cfg.context_scale, cfg.context_aspect, "context"),
        ):
            for u in draws:
                for v in draws if cfg.edge == "corrected" else [u]:
                    h, w = block_size_from_draws(u, v, self.grid, scale, aspect, cfg.edge)
                    if h * w <= cfg.min_keep:
                        raise ValueError(
                            f"a {what} block of {h}x{w} patches on a {H}x{W} grid can never keep more than "
                            f"min_keep={cfg.min_keep}: lower mask.min_keep, raise mask.{what}_scale or use a finer grid"
                        )

    def _place(self, gen: torch.Generator, size: tuple[int, int], allowed: list[torch.Tensor]) -> torch.Tensor:
        """A block of the given size at a random position, restricted to `allowed` regions.

        Like the official collator: after `attempts` placements that keep too few patches, one
        restricting region is dropped, and so on, so the draw always ends.
        """
        H, W = self.grid
        h, w = size
        slack = 0 if self.cfg.edge == "official" else 1
        relaxed, failures = 0, 0
        while True:
            top = int(torch.randint(0, H - h + slack, (1,), generator=gen))
            left = int(torch.randint(0, W - w + slack, (1,), generator=gen))
            mask = torch.zeros(H, W, dtype=torch.bool)
            mask[top : top + h, left : left + w] = True
            for region in allowed[: max(len(allowed) - relaxed, 0)]:
                mask &= region
            idx = mask.flatten().nonzero().squeeze(1)
            if len(idx) > self.cfg.min_keep:
                return idx
            failures += 1
            if failures == self.cfg.attempts:
                relaxed, failures = relaxed + 1, 0

    def sample(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Context indices [B, Kc] and a list of num_targets target index tensors [B, Kt]."""
        c = self.cfg
        tgt_size = block_size(gen, self.grid, c.target_scale, c.target_aspect, c.edge)
        ctx_size = block_size(gen, self.grid, c.context_scale, c.context_aspect, c.edge)
        contexts, targets = [], []
        for _ in range(batch_size):
            blocks, allowed = [], []
            for _ in range(c.num_targets):
                idx = self._place(gen, tgt_size, [])
                blocks.append(idx)
                if not c.allow_overlap:
                    region = torch.ones(self.grid, dtype=torch.bool)
                    region.view(-1)[idx] = False
                    allowed.append(region)
            targets.append(blocks)
            contexts.append(self._place(gen, ctx_size, allowed))
        keep_ctx = min(len(i) for i in contexts)
        keep_tgt = min(len(i) for blocks in targets for i in blocks)
        context = torch.stack([i[:keep_ctx] for i in contexts])
        target = [torch.stack([blocks[k][:keep_tgt] for blocks in targets]) for k in range(c.num_targets)]
        return context, target


class RandomMask(NamedTuple):
    """MAE's mask: kept positions [B, K], removed positions [B, N-K], mask [B, N] (1 = removed)."""

    keep: torch.Tensor
    removed: torch.Tensor
    mask: torch.Tensor


def random_masking(noise: torch.Tensor, mask_ratio: float) -> RandomMask:
    """MAE's per-sample random masking: keep the patches with the lowest noise.

    The noise [B, N] is an argument, not drawn here, so a run (or the official code fed the same
    noise) can be reproduced exactly. Kept and removed positions come in ascending-noise order,
    as the official ids_shuffle does; every sample keeps int(N * (1 - mask_ratio)) patches.
    """
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    n = noise.size(1)
    keep = int(n * (1 - mask_ratio))
    if not 0 < keep < n:
        raise ValueError(f"mask_ratio={mask_ratio} on {n} patches keeps {keep}: nothing to see or to predict")
    order = torch.argsort(noise, dim=1)
    mask = torch.ones_like(noise)
    mask.scatter_(1, order[:, :keep], 0.0)
    return RandomMask(order[:, :keep], order[:, keep:], mask)
