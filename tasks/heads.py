"""Classification heads that sit on patch tokens [B, N, D].

- `AttentiveClassifier` (V-JEPA style): one learned query attends over the tokens in one
  cross-attention block (attention + MLP, pre-norm, residual on the query), then a linear layer.
  It is the head of the attentive probe and of predictor finetuning.
- `PooledLinear` (MAE finetuning): average of the tokens, LayerNorm, linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Mlp

from benchmark.core.layers import LayerNorm, init_transformer_weights

HEADS = ("attentive", "pooled")


class AttentivePooler(nn.Module):
    """Tokens [B, N, D] -> one pooled vector [B, D] through a learned query."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attentive head: token width {dim} is not divisible by num_heads={num_heads}")
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q = LayerNorm(dim)
        self.norm_kv = LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(tokens.size(0), -1, -1)
        kv = self.norm_kv(tokens)
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        q = q + self.mlp(self.norm_mlp(q))
        return q.squeeze(1)


class AttentiveClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.pooler = AttentivePooler(dim, num_heads, mlp_ratio)
        self.linear = nn.Linear(dim, num_classes)
        init_transformer_weights(self.linear)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pooler(tokens))


class PooledLinear(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)
        init_transformer_weights(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(tokens.mean(dim=1)))


def build_head(kind: str, dim: int, num_classes: int, num_heads: int) -> nn.Module:
    if kind == "attentive":
        return AttentiveClassifier(dim, num_classes, num_heads)
    if kind == "pooled":
        return PooledLinear(dim, num_classes)
    raise ValueError(f"unknown head {kind!r} (choose {' or '.join(HEADS)})")
