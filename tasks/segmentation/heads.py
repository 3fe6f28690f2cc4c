"""Segmentation heads in plain torch (the `native` backend).

`LinearHead`: BatchNorm + 1x1 convolution on last-layer patch tokens (DINOv2/v3 linear eval).
`UperNetHead`: pyramid pooling on the coarsest level + a feature pyramid over all four,
fused by a 3x3 convolution (the layout of mmseg's UPerHead). `FCNHead`: the auxiliary head
(one 3x3 conv block on one level), whose loss is added with a weight (0.4).
They start from torch's default initialisation, or from mmseg's (`init_like_mmseg`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class LinearHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(grid))


class UperNetHead(nn.Module):
    def __init__(
        self,
        in_dims: list[int],
        channels: int,
        num_classes: int,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList(conv_bn_relu(in_dims[-1], channels, 1) for _ in pool_scales)
        self.bottleneck = conv_bn_relu(in_dims[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(d, channels, 1) for d in in_dims[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_dims[:-1])
        self.fuse = conv_bn_relu(len(in_dims) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        top = levels[-1]
        pooled = [upsample_to(conv(F.adaptive_avg_pool2d(top, s)), top) for s, conv in zip(self.pool_scales, self.ppm)]
        laterals = [conv(x) for conv, x in zip(self.lateral, levels)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], 1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + upsample_to(laterals[i], laterals[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [upsample_to(x, outs[0]) for x in outs[1:]]
        return self.classify(self.dropout(self.fuse(torch.cat(outs, 1))))


class FCNHead(nn.Module):
    def __init__(self, in_dim: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_dim, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.dropout(self.conv(x)))


def init_like_mmseg(head: nn.Module) -> nn.Module:
    """mmseg's initialisation of a decode head: its ConvModules' convolutions kaiming-normal
    (fan_out, relu), norms 1 and 0 (torch's default already), the classifier normal(0, 0.01)
    with a zero bias."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d) and m is not head.classify:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    nn.init.normal_(head.classify.weight, std=0.01)
    nn.init.zeros_(head.classify.bias)
    return head
