"""A toy method written against the method contract alone (the worked example of docs/extending.md).

Masked latent prediction without attention: a patch-MLP encoder, no EMA target (the encoder's
own normalised tokens, without gradient, are the targets) and a small MLP predictor that sees the
mean of the visible tokens and a learned query per position. Nothing else in the harness knows
it: registering it is enough for pretraining, checkpoints and every task that applies.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from benchmark.core.layers import LayerNorm, gather_tokens, init_transformer_weights, tokens_to_map
from benchmark.core.transforms import crop_transform
from methods.base import Capabilities, Method
from methods.losses import normalize_targets
from methods.vit import PatchEmbed, resample_pos_embed, set_geometry


class MixerLayer(nn.Module):
    """A residual token-wise MLP (no mixing across tokens: the simplest possible block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.mlp = LayerNorm(dim), Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class ToyEncoder(nn.Module):
    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int):
        super().__init__()
        set_geometry(self, image_size, patch_size, dim, depth, num_heads=1)
        self.patch_embed = PatchEmbed(patch_size, 3, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.blocks = nn.ModuleList(MixerLayer(dim) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def levels(self, images: torch.Tensor, blocks: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, w = images.size(-2) // self.patch_size, images.size(-1) // self.patch_size
        x = self.patch_embed(images) + resample_pos_embed(self.pos_embed, h, w)
        outs = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            outs.extend(tokens_to_map(x, h, w) for _ in range(blocks.count(i)))
        return outs, tokens_to_map(self.norm(x), h, w)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed
        if keep is not None:
            x = gather_tokens(x, keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class ToyPredictor(nn.Module):
    """Mean of the context (and extra) tokens + a learned query per position -> a latent there."""

    def __init__(self, num_patches: int, dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.mlp = Mlp(2 * dim, 2 * dim, dim)
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, context, ctx_idx, tgt_idx, extra=None):
        seen = context if extra is None else torch.cat([context, extra], dim=1)
        q = gather_tokens(self.queries.expand(tgt_idx.size(0), -1, -1), tgt_idx)
        return self.mlp(torch.cat([q, seen.mean(1, keepdim=True).expand_as(q)], dim=-1))


class Toy(Method):
    """Toy masked latent prediction: patch-MLP encoder, MLP predictor, no target encoder."""

    name = "toy"
    default_encoder_key = "encoder"

    def __init__(self, model_cfg: dict, method_cfg: dict, image_size: int):
        super().__init__(model_cfg, method_cfg, image_size)
        self.encoder = ToyEncoder(image_size, model_cfg["patch_size"], model_cfg["embed_dim"], model_cfg["depth"])
        self.predictor = self.new_predictor()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(predictor=True, target_encoder=False, conditioned=False)

    def new_predictor(self) -> nn.Module:
        return ToyPredictor(self.encoder.num_patches, self.encoder.embed_dim)

    def train_transform(self):
        return crop_transform(self.image_size, (0.5, 1.0), flip=True)

    def collate(self, items: list) -> dict:
        views, labels, seeds = zip(*items)
        gen = torch.Generator().manual_seed(seeds[0])
        order = torch.rand(len(items), self.encoder.num_patches, generator=gen).argsort(dim=1)
        keep = self.encoder.num_patches // 2
        return {
            "images": torch.stack(views),
            "labels": torch.tensor(labels),
            "keep": order[:, :keep].sort(dim=1).values,
            "removed": order[:, keep:].sort(dim=1).values,
        }

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = gather_tokens(normalize_targets(self.encoder(batch["images"])), batch["removed"])
        context = self.encoder(batch["images"], keep=batch["keep"])
        pred = self.predictor(context, batch["keep"], batch["removed"])
        return {"loss": F.mse_loss(pred.float(), target.float())}

    def predict(self, context, ctx_idx, tgt_idx, action=None, extra=None):
        return self.predictor(context, ctx_idx, tgt_idx, extra)

    def dense_features(self, images, key, blocks):
        return self.eval_encoder(key).levels(images, blocks)
