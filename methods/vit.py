"""The ViT encoder and the JEPA predictor shared by every method.

Built from timm blocks with the official I-JEPA/MAE architecture details (pre-LN, qkv bias,
MLP ratio 4, LayerNorm eps 1e-6, fixed 2-D sin-cos position embeddings), and with the official
parameter names, so that released checkpoints load key for key.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from benchmark.core.errors import CheckpointError
from benchmark.core.layers import LayerNorm, gather_tokens, init_transformer_weights, tokens_to_map


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim] table: sin of every frequency, then cos of every frequency."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h * grid_w, dim] fixed position table, row-major over the patch grid.

    Half the channels encode the column and half the row, in the order the official MAE/I-JEPA
    code uses (column first), so tables computed here equal those stored in their checkpoints.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()


def rescale_residual_branches(blocks: nn.ModuleList) -> None:
    """Scale each block's output projections by 1/sqrt(2 * layer), as the official code does."""
    for layer, block in enumerate(blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer))


def make_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float) -> nn.ModuleList:
    # On the CPU whatever the default device (a planning build on the meta device has no data).
    rates = torch.linspace(0, drop_path, depth, device="cpu").tolist() if depth else []
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rate, norm_layer=LayerNorm) for rate in rates
    )


def block_on_tail(block: Block, x: torch.Tensor, n: int) -> torch.Tensor:
    """`block(x)[:, -n:]` without computing the other tokens' outputs.

    Every token is still attended to, but only the last n get the attention output projection,
    the residuals and the MLP: in the predictor's last block only the mask tokens reach the loss,
    which saves about half of that block.
    """
    attn = block.attn
    B, N, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q[:, :, -n:]), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if block.training else 0.0)
    else:
        out = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(B, n, -1)
    y = x[:, -n:] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attn.norm(out)))))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def blocks_on_tail(blocks: nn.ModuleList, x: torch.Tensor, n: int) -> torch.Tensor:
    """`blocks(x)[:, -n:]`, the last block computing only those n tokens (see block_on_tail)."""
    if not len(blocks):
        return x[:, -n:]
    for block in blocks[:-1]:
        x = block(x)
    return block_on_tail(blocks[-1], x, n)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens [B, N, dim], row-major (a stride-p convolution).

    `forward(images, keep=idx)` embeds only the patches at positions idx [B, K]: each is one row
    of the convolution written as a matrix product, so a masked view (MAE keeps 25 %) pays only
    for the patches it keeps. Same weights, same result up to float rounding.
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:
            return self.proj(x).flatten(2).transpose(1, 2)
        b, c, h, w = x.shape
        p = self.proj.kernel_size[0]
        # Patches flattened (channel, row, column), the order of the convolution's weight.
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return F.linear(gather_tokens(patches, keep), self.proj.weight.flatten(1), self.proj.bias)


def set_geometry(
    encoder: nn.Module, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int
) -> None:
    """The size attributes every ViT encoder here carries (tasks and checkpoint code read them)."""
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
    encoder.img_size, encoder.patch_size = img_size, patch_size
    encoder.grid = img_size // patch_size
    encoder.num_patches = encoder.grid * encoder.grid
    encoder.embed_dim, encoder.depth, encoder.num_heads = embed_dim, depth, num_heads


class VisionTransformer(nn.Module):
    """Patch tokens in, patch tokens out (no cls token: the JEPA encoder).

    `forward(images, keep=idx)` encodes only the patches at positions idx [B, K] (the context of a
    masked view); position embeddings are added before the patches are dropped.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        set_geometry(self, img_size, patch_size, embed_dim, depth, num_heads)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, self.grid, self.grid).unsqueeze(0), requires_grad=False)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path)
        self.norm = LayerNorm(embed_dim)
        self.apply(init_transformer_weights)
        rescale_residual_branches(self.blocks)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        # The whole image through the convolution, then the kept tokens: the kept-patch path
        # (MAE's) would save little here and round differently (see docs/performance.md).
        x = self.patch_embed(images) + self.pos_embed
        if keep is not None:
            x = gather_tokens(x, keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


CONDITIONING = ("none", "feature", "sequence")


class Predictor(nn.Module):
    """The JEPA predictor (IWM's world model): context tokens plus one mask token per position.

    `forward(context, ctx_idx, tgt_idx, action)` with context [B, Kc, D] at grid positions
    ctx_idx [B, Kc] returns predictions [B, Kt, D] for positions tgt_idx [B, Kt]. Callers
    predicting several target blocks stack them along the batch (see `IJEPA.predict_blocks`).

    Conditioning on the action [B, A] (IWM):
    - none: the action is ignored (I-JEPA; the official parameter names, nothing added);
    - feature: the action is concatenated to every position-embedded mask token and mixed back
      to the predictor width by a 3-layer MLP;
    - sequence: each action scalar becomes one extra token through its own linear projection.
    A missing action means the null action (zeros): "change nothing".

    `extra` [B, T, D] are tokens in the encoder's space appended to the context without a
    position (e.g. the learned task tokens of multitask predictor tuning); they are embedded like
    context tokens, so a caller never needs the predictor's width.
    """

    def __init__(
        self,
        num_patches: int,
        grid: int,
        embed_dim: int,
        predictor_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        conditioning: str = "none",
        action_dim: int = 0,
    ):
        super().__init__()
        if conditioning not in CONDITIONING:
            raise ValueError(f"predictor conditioning must be one of {CONDITIONING}, got {conditioning!r}")
        if conditioning != "none" and action_dim < 1:
            raise ValueError(f"{conditioning} conditioning needs action_dim >= 1")
        self.conditioning, self.action_dim = conditioning, action_dim
        self.num_patches, self.embed_dim, self.predictor_dim = num_patches, embed_dim, predictor_dim
        self.depth, self.num_heads = depth, num_heads
        self.predictor_embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        self.predictor_pos_embed = nn.Parameter(sincos_2d(predictor_dim, grid, grid).unsqueeze(0), requires_grad=False)
        self.predictor_blocks = make_blocks(predictor_dim, depth, num_heads, mlp_ratio, drop_path)
        self.predictor_norm = LayerNorm(predictor_dim)
        self.predictor_proj = nn.Linear(predictor_dim, embed_dim)
        if conditioning == "feature":
            self.action_mixer = nn.Sequential(
                nn.Linear(predictor_dim + action_dim, predictor_dim),
                nn.GELU(),
                nn.Linear(predictor_dim, predictor_dim),
                nn.GELU(),
                nn.Linear(predictor_dim, predictor_dim),
            )
        elif conditioning == "sequence":
            self.action_proj = nn.ModuleList(nn.Linear(1, predictor_dim) for _ in range(action_dim))
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        rescale_residual_branches(self.predictor_blocks)

    def mask_tokens(self, tgt_idx: torch.Tensor) -> torch.Tensor:
        """Position-embedded mask tokens [B, Kt, predictor_dim]; conditioning hooks in here."""
        pos = self.predictor_pos_embed.expand(tgt_idx.size(0), -1, -1)
        return self.mask_token + gather_tokens(pos, tgt_idx)

    def forward(
        self,
        context: torch.Tensor,
        ctx_idx: torch.Tensor,
        tgt_idx: torch.Tensor,
        action: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pos = self.predictor_pos_embed.expand(context.size(0), -1, -1)
        parts = [self.predictor_embed(context) + gather_tokens(pos, ctx_idx)]
        if extra is not None:
            parts.append(self.predictor_embed(extra))
        queries = self.mask_tokens(tgt_idx)
        if self.conditioning != "none":
            if action is None:
                action = context.new_zeros(context.size(0), self.action_dim)
            action = action.to(queries.dtype)
            if self.conditioning == "feature":
                expanded = action.unsqueeze(1).expand(-1, queries.size(1), -1)
                queries = self.action_mixer(torch.cat([queries, expanded], dim=-1))
            else:
                parts.append(torch.stack([proj(action[:, i : i + 1]) for i, proj in enumerate(self.action_proj)], 1))
        x = torch.cat([*parts, queries], dim=1)
        x = blocks_on_tail(self.predictor_blocks, x, queries.size(1))
        return self.predictor_proj(self.predictor_norm(x))


# --- dense features and position tables at another resolution ---------------------------------
def resample_pos_embed(pos: torch.Tensor, h: int, w: int, prefix_tokens: int = 0) -> torch.Tensor:
    """[1, prefix + g*g, D] -> [1, prefix + h*w, D]: bicubic on the square patch grid, prefix
    rows (a cls slot) kept as they are; unchanged when the grid already is h x w."""
    head, table = pos[:, :prefix_tokens], pos[:, prefix_tokens:]
    old = math.isqrt(table.size(1))
    if (old, old) == (h, w):
        return pos
    img = table.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False)
    table = img.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)
    return torch.cat([head, table], dim=1)


def encoder_levels(
    encoder: nn.Module,
    images: torch.Tensor,
    blocks: list[int],
    cls_token: torch.Tensor | None = None,
    positions: Callable[[int, int], torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Maps [B, D, h, w] after each listed block (1-based) of a ViT encoder and its normed last
    layer. `cls_token` (MAE, DINO) rides along in front of the patches, its position in the
    table's first row, and is dropped from the maps. `positions(h, w)` gives the position table
    for an h x w grid when the encoder resamples its own (DINO); else `resample_pos_embed`."""
    p = encoder.patch_size
    h, w = images.size(-2) // p, images.size(-1) // p
    prefix = 0 if cls_token is None else 1
    pos = positions(h, w) if positions is not None else resample_pos_embed(encoder.pos_embed, h, w, prefix)
    x = encoder.patch_embed(images) + pos[:, prefix:]
    if cls_token is not None:
        x = torch.cat([(cls_token + pos[:, :1]).expand(x.size(0), -1, -1), x], 1)
    if any(not 1 <= b <= len(encoder.blocks) for b in blocks):
        raise ValueError(f"feature blocks must be in 1..{len(encoder.blocks)}, got {list(blocks)}")
    outs = []
    for i, block in enumerate(encoder.blocks, start=1):
        x = block(x)
        outs.extend(tokens_to_map(x[:, prefix:], h, w) for _ in range(blocks.count(i)))
    return outs, tokens_to_map(encoder.norm(x)[:, prefix:], h, w)


# --- reading a released file's architecture off its tensors -------------------------------------
def tensor_shape(weights: dict, key: str, what: str) -> tuple[int, ...]:
    if key not in weights or not isinstance(weights[key], torch.Tensor):
        raise CheckpointError(f"{what} has no tensor {key!r}: cannot read its architecture")
    return tuple(weights[key].shape)


def count_blocks(weights: dict, prefix: str) -> int:
    """Number of distinct blocks `prefix{i}.`; a gap in the numbering then fails in load_weights."""
    return len({k[len(prefix) :].split(".")[0] for k in weights if k.startswith(prefix)})


def vit_architecture(weights: dict, prefix_tokens: int, what: str) -> dict:
    """model.* config values (patch_size, embed_dim, depth, mlp_ratio) of a ViT encoder's tensors.

    Heads are not recoverable from the weights (qkv is [3D, D] for any head count).
    """
    dim, _, p, p2 = tensor_shape(weights, "patch_embed.proj.weight", what)
    if p != p2:
        raise CheckpointError(f"{what}: non-square patches {p}x{p2} are not supported")
    tokens = tensor_shape(weights, "pos_embed", what)[1] - prefix_tokens
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{what}: pos_embed holds {tokens} patch positions, not a square grid")
    hidden = tensor_shape(weights, "blocks.0.mlp.fc1.weight", what)[0]
    return {
        "model.patch_size": p,
        "model.embed_dim": dim,
        "model.depth": count_blocks(weights, "blocks."),
        "model.mlp_ratio": hidden / dim,
    }
