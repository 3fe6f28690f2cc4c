"""Which encoder blocks feed the segmentation heads, and the feature pyramid built from them.

The maps themselves come from the method contract (`method.dense_features`): intermediate
blocks of the evaluation encoder, evenly spaced (blocks 4/6/8/12 of ViT-B), and its normed last
layer. `Pyramid` rescales four maps x4, x2, x1, x0.5 by deconvolution / identity /
max-pooling, as the BEiT/MAE mmseg backbones do. The predictor's prediction of the whole image
(`method.predict_full`) is one level: all four maps come from it then (a simple feature pyramid).

What mmseg's MAE backbone adds to a pretrained ViT before finetuning, done here on the copy that
trains: layer scale on every block's two residual branches (`add_layer_scale`), a learned
relative position bias in every block's attention (`add_rel_pos_bias`), and a position table
resampled once to the crop's grid and trained from there (`train_pos_table`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerScale
from timm.models.vision_transformer import Block

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


def add_layer_scale(encoder: nn.Module, init: float) -> None:
    """A learned per-channel scale, starting at `init`, on each block's attention and MLP branch."""
    for block in [m for m in encoder.modules() if isinstance(m, Block)]:
        dim = block.norm1.normalized_shape[0]
        block.ls1, block.ls2 = LayerScale(dim, init), LayerScale(dim, init)


def train_pos_table(encoder: nn.Module, grid: int) -> None:
    """Replace the encoder's fixed position table by a trainable one on a grid x grid patch grid,
    resampled bicubically; rows in front of the patch positions (a cls slot) are kept as they are.

    The table is resampled once, as mmseg does when it loads a checkpoint into a 512 px backbone,
    so the finetuned parameter is the table the crops use."""
    pos = encoder.pos_embed.detach()
    prefix = pos.size(1) - encoder.num_patches
    head, table = pos[:, :prefix], pos[:, prefix:]
    old = math.isqrt(table.size(1))
    if old != grid:
        img = table.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
        table = img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    encoder.pos_embed = nn.Parameter(torch.cat([head, table], dim=1).clone())
    encoder.img_size, encoder.grid, encoder.num_patches = grid * encoder.patch_size, grid, grid * grid


class RelPosAttention(nn.Module):
    """A block's attention plus a learned bias on its logits, one per head and relative offset
    between two patches of a grid x grid map (BEiT's relative position bias, zero at the start).

    With a cls slot in front of the patches, three more entries per head: the cls token
    attending to a patch, a patch attending to the cls token, the cls token to itself."""

    def __init__(self, attn: nn.Module, grid: int, prefix: int):
        super().__init__()
        self.inner, self.tokens = attn, prefix + grid * grid
        offsets = (2 * grid - 1) ** 2
        self.table = nn.Parameter(torch.zeros(offsets + 3 * prefix, attn.num_heads))
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        patches = (rows[:, None] - rows[None] + grid - 1) * (2 * grid - 1) + cols[:, None] - cols[None] + grid - 1
        index = torch.full((self.tokens, self.tokens), offsets + 2, dtype=torch.long)
        index[prefix:, prefix:] = patches
        if prefix:
            index[0, 1:], index[1:, 0] = offsets, offsets + 1
        self.register_buffer("index", index, persistent=False)

    @property
    def fused_attn(self) -> bool:  # the kernel switch benchmark.core.layers.use_attention sets
        return self.inner.fused_attn

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        self.inner.fused_attn = value

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if x.size(1) != self.tokens:
            raise ValueError(f"relative position bias is for {self.tokens} tokens (the crop), got {x.size(1)}")
        bias = self.table[self.index].permute(2, 0, 1).unsqueeze(0)
        return self.inner(x, attn_mask=bias if attn_mask is None else bias + attn_mask, is_causal=is_causal)


def add_rel_pos_bias(encoder: nn.Module, grid: int) -> None:
    """A relative position bias (`RelPosAttention`) in every block, for grid x grid patch maps."""
    prefix = encoder.pos_embed.size(1) - encoder.num_patches
    for block in [m for m in encoder.modules() if isinstance(m, Block)]:
        block.attn = RelPosAttention(block.attn, grid, prefix)
