"""Dense features from a method's encoder, or from its predictor, for segmentation heads.

`ViTLevels` reads intermediate blocks of the evaluation encoder (the shared ViT: `patch_embed`,
`pos_embed`, `blocks`, `norm`), evenly spaced (blocks 4/6/8/12 of ViT-B), as feature maps, and
its normed last layer. Position embeddings are interpolated when the crop differs from the
pretraining resolution. `Pyramid` rescales four maps x4, x2, x1, x0.5 by deconvolution /
identity / max-pooling, as the BEiT/MAE mmseg backbones do. The predictor's prediction of the
whole image (`method.predict_full`) is one level: all four maps come from it then (a simple
feature pyramid).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        return nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                             nn.ConvTranspose2d(dim, dim, 2, 2))
    if scale == 2:
        return nn.ConvTranspose2d(dim, dim, 2, 2)
    if scale == 1:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(2)
    raise ValueError(f"unsupported feature scale {scale}")


def tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, D] -> [B, D, h, w]."""
    return tokens.transpose(1, 2).reshape(tokens.size(0), tokens.size(2), h, w)


def resized_pos_embed(pos: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(patch position table [1, h*w, D], cls slot or None), bicubic-interpolated when the grid differs."""
    cls = None
    n = pos.size(1)
    if math.isqrt(n) ** 2 != n:  # MAE-style table with a cls slot first
        cls, pos = pos[:, :1], pos[:, 1:]
        n -= 1
    g = math.isqrt(n)
    if (g, g) != (h, w):
        grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
        pos = pos.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(grid.dtype)
    return pos, cls


class ViTLevels(nn.Module):
    """Encoder -> feature maps [B, D, h, w] of the chosen blocks and the normed last layer."""

    def __init__(self, encoder: nn.Module, blocks: list[int] | None = None):
        super().__init__()
        self.encoder = encoder
        self.dim, self.patch = encoder.embed_dim, encoder.patch_size
        self.blocks = level_blocks(len(encoder.blocks), blocks)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, w = images.size(-2) // self.patch, images.size(-1) // self.patch
        pos, cls = resized_pos_embed(self.encoder.pos_embed, h, w)
        x = self.encoder.patch_embed(images) + pos
        extra = 0
        if cls is not None and getattr(self.encoder, "cls_token", None) is not None:
            x = torch.cat([(self.encoder.cls_token + cls).expand(x.size(0), -1, -1), x], 1)
            extra = 1
        outs = []
        for i, block in enumerate(self.encoder.blocks, start=1):
            x = block(x)
            outs.extend(tokens_to_map(x[:, extra:], h, w) for _ in range(self.blocks.count(i)))
        return outs, tokens_to_map(self.encoder.norm(x)[:, extra:], h, w)


class Pyramid(nn.Module):
    """Four maps at the patch stride -> strides patch/4, patch/2, patch, 2*patch."""

    def __init__(self, dim: int):
        super().__init__()
        self.rescale = nn.ModuleList(rescaler(dim, s) for s in SCALES)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [r(m) for r, m in zip(self.rescale, maps)]
