"""Classification heads that sit on patch tokens [B, N, D].

- `AttentiveClassifier`: the V-JEPA attentive probe head (facebookresearch/jepa,
  src/models/attentive_pooler.py), reimplemented with the same parameter names, shapes,
  initialisation and forward, so an official probe state dict loads with strict=True and gives
  the official logits (tests/test_official_attentive.py checks both against a fixture made by
  the official code). One learned query cross-attends over the tokens (attention + MLP, residual
  on the query), optional self-attention blocks over the queries follow, then a linear layer.
  It is the head of the attentive probe and of predictor finetuning.
- `PooledLinear` (MAE finetuning): average of the tokens, LayerNorm, linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block

from benchmark.core.layers import LayerNorm, init_transformer_weights

HEADS = ("attentive", "pooled")

# The official probe keeps nn.LayerNorm's default eps 1e-5, unlike the encoders' 1e-6 LayerNorm.
PROBE_NORM = nn.LayerNorm
INIT_STD = 0.02


class CrossAttention(nn.Module):
    """Queries [B, n, D] attend over tokens [B, N, D] (already normalised) -> [B, n, D]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        # Registered, initialised and rescaled but never applied: the official forward skips its
        # output projection (applying it was tried upstream and reverted in a0517b4 as it broke
        # the evals), so the official state dicts carry an unused proj and the official logits
        # are computed without it.
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        (b, n, d), h = q.shape, self.num_heads
        q = self.q(q).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(x).view(b, x.size(1), 2, h, d // h).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + MLP with residuals on the queries; only the tokens are
    normalised before the attention (the queries enter it raw), as in the official block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = PROBE_NORM(dim)
        self.xattn = CrossAttention(dim, num_heads)
        self.norm2 = PROBE_NORM(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = q + self.xattn(q, self.norm1(x))
        return q + self.mlp(self.norm2(q))


class AttentivePooler(nn.Module):
    """Tokens [B, N, D] -> [B, num_queries, D]: learned queries through one cross-attention
    block, then depth - 1 self-attention blocks over the queries alone."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, depth: int = 1, num_queries: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attentive head: token width {dim} is not divisible by num_heads={num_heads}")
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.cross_attention_block = CrossAttentionBlock(dim, num_heads, mlp_ratio)
        # timm's Block is the official self-attention Block: same parameter names, same maths.
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=PROBE_NORM) for _ in range(depth - 1)
        )
        # The official order of random draws (query, then every module in `apply` order), so the
        # same seed gives the official head bit for bit.
        nn.init.trunc_normal_(self.query_tokens, std=INIT_STD)
        self.apply(init_transformer_weights)
        self._rescale_residual_outputs()

    @torch.no_grad()
    def _rescale_residual_outputs(self) -> None:
        """Divide each residual branch's output matrix by sqrt(2 * layer), layer 1 being the
        cross-attention block, as the official init does (its unused proj included)."""
        branches = [(1, self.cross_attention_block.xattn.proj), (1, self.cross_attention_block.mlp.fc2)]
        for layer, block in enumerate(self.blocks, 2):
            branches += [(layer, block.attn.proj), (layer, block.mlp.fc2)]
        for layer, linear in branches:
            linear.weight.div_(math.sqrt(2.0 * layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.cross_attention_block(self.query_tokens.expand(tokens.size(0), -1, -1), tokens)
        for block in self.blocks:
            q = block(q)
        return q


class AttentiveClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_heads: int, mlp_ratio: float = 4.0, depth: int = 1):
        super().__init__()
        self.pooler = AttentivePooler(dim, num_heads, mlp_ratio, depth)
        # Left at torch's default Linear init: the official classifier initialises only the pooler.
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pooler(tokens).squeeze(1))


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
