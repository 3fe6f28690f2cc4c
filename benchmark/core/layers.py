"""Small tensor and module helpers shared by the methods and the task heads."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

# The official JEPA/MAE LayerNorm.
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Tokens of x [B, N, D] at per-sample positions idx [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, D] -> [B, D, h, w]."""
    return tokens.transpose(1, 2).reshape(tokens.size(0), tokens.size(2), h, w)


def init_transformer_weights(module: nn.Module) -> None:
    """The official JEPA initialisation: truncated normal 0.02, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch on `device`; everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


ATTENTION = ("auto", "fused", "math")


def use_attention(module: nn.Module, kind: str, device: torch.device, bf16: bool) -> Callable[[], None]:
    """Set the attention kernel of every block; returns a function that restores the previous ones.

    `fused` is torch's scaled_dot_product_attention, `math` the explicit matmuls and softmax,
    `auto` picks math for bf16 on CPU, where SDPA's flash kernel (its backward above all) is
    slower at these short sequences (docs/performance.md), and fused everywhere else.
    """
    if kind not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {kind!r}")
    fused = kind == "fused" or (kind == "auto" and not (device.type == "cpu" and bf16))
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    before = [b.attn.fused_attn for b in blocks]
    for b in blocks:
        b.attn.fused_attn = fused

    def restore() -> None:
        for b, flag in zip(blocks, before):
            b.attn.fused_attn = flag

    return restore
