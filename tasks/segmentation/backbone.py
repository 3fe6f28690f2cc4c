"""Which encoder blocks feed the segmentation heads, and the feature pyramid built from them.

The maps themselves come from the method contract (`method.dense_features`): intermediate
blocks of the evaluation encoder, evenly spaced (blocks 4/6/8/12 of ViT-B), and its normed last
layer. `Pyramid` rescales four maps x4, x2, x1, x0.5 by deconvolution / identity /
max-pooling, as the BEiT/MAE mmseg backbones do. The predictor's prediction of the whole image
(`method.predict_full`) is one level: all four maps come from it then (a simple feature pyramid).
"""

from __future__ import annotations

import torch
import torch.nn as nn

SCALES = (4, 2, 1, 0.5)


def level_blocks(depth: int, blocks: list[int] | None = None) -> list[int]:
    """1-based blocks whose outputs feed the four levels: given, or evenly spaced up to the last."""
    if blocks:
        if len(blocks) != len(SCALES) or not all(1 <= b <= depth for b in blocks):
            raise ValueError(f"feature blocks must be {len(SCALES)} numbers in 1..{depth}, got {list(blocks)}")
        return list(blocks)
    return [max(1, depth // 3), max(1, depth // 2), max(1, 2 * depth // 3), depth]


def rescaler(dim: int, scale: float) -> nn.Module:
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2)
        )
    if scale == 2:
        return nn.ConvTranspose2d(dim, dim, 2, 2)
    if scale == 1:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(2)
    raise ValueError(f"unsupported feature scale {scale}")


class Pyramid(nn.Module):
    """Four maps at the patch stride -> strides patch/4, patch/2, patch, 2*patch."""

    def __init__(self, dim: int):
        super().__init__()
        self.rescale = nn.ModuleList(rescaler(dim, s) for s in SCALES)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [r(m) for r, m in zip(self.rescale, maps)]
