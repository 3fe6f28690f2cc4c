"""MAE (arXiv 2111.06377): reconstruct the pixels of randomly removed patches.

The encoder sees the visible patches only (each with its position embedding, the cls
token after); the decoder gets the encoded tokens plus one shared mask token per removed
position, fixed sin-cos positions, and predicts each removed patch's pixels. Loss: per-patch MSE
over removed patches, on normalised pixels with norm_pix_loss. Parameter names are the official
ones, so released files load key for key.

Through the method contract the decoder is MAE's predictor ("world model"): `predict` returns
pixel predictions at the query positions, `predict_full` the decoder features (after
decoder_norm) of a whole clean image with nothing masked.

Also the official MAE release layout, read and written here: `mae_pretrain_vit_*.pth` is
{'model': encoder state dict} (cls_token, pos_embed [1, 1 + N, D] with the cls slot first,
patch_embed, blocks, norm); the `_full` and `mae_visualize_` files add mask_token and
decoder_{embed,pos_embed,blocks,norm,pred}.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from benchmark.core.checkpoint import load_weights, strip_prefix
from benchmark.core.errors import CheckpointError
from benchmark.core.layers import LayerNorm, gather_tokens
from benchmark.core.transforms import crop_transform
from methods.base import Capabilities, Method, check_number, check_predictor
from methods.losses import masked_pixel_loss, normalize_patches, patchify
from methods.masks import random_masking
from methods.vit import (
    PatchEmbed,
    blocks_on_tail,
    count_blocks,
    encoder_levels,
    make_blocks,
    resample_pos_embed,
    set_geometry,
    sincos_2d,
    tensor_shape,
    vit_architecture,
)

DECODER_PREFIXES = ("mask_token", "decoder_")


def sincos_with_cls(dim: int, grid: int) -> torch.Tensor:
    """[1, 1 + grid*grid, dim]: the 2-D sin-cos table behind a zero row for the cls slot (official)."""
    table = sincos_2d(dim, grid, grid)
    return torch.cat([table.new_zeros(1, dim), table]).unsqueeze(0)


def init_mae_weights(module: nn.Module) -> None:
    """The official MAE initialisation: xavier-uniform linears (and patch projection), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, PatchEmbed):
        # Initialised as the linear layer it is, not as a convolution.
        nn.init.xavier_uniform_(module.proj.weight.view(module.proj.weight.size(0), -1))
        nn.init.zeros_(module.proj.bias)


class MAEEncoder(nn.Module):
    """MAE's ViT: cls token, fixed sin-cos positions (zero at the cls slot), pre-LN timm blocks.

    `forward(images)` gives the patch tokens [B, N, D] (what tasks evaluate);
    `forward_with_cls(images, keep)` gives [B, 1 + K, D] with the cls token first, encoding only
    the patches at positions keep [B, K] when given.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        in_chans: int = 3,
    ):
        super().__init__()
        set_geometry(self, img_size, patch_size, embed_dim, depth, num_heads)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_with_cls(embed_dim, self.grid), requires_grad=False)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path)
        self.norm = LayerNorm(embed_dim)
        self.apply(init_mae_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward_with_cls(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        pos = self.pos_embed[:, 1:]
        if keep is None:
            x = self.patch_embed(images) + pos
        else:
            x = self.patch_embed(images, keep) + gather_tokens(pos.expand(images.size(0), -1, -1), keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.size(0), -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_cls(images)[:, 1:]

    def cls_features(self, images: torch.Tensor) -> torch.Tensor:
        """The last-layer cls token [B, D], normed (the feature MAE's official linear probe reads)."""
        return self.forward_with_cls(images)[:, 0]


class MAEDecoder(nn.Module):
    """MAE's decoder: encoded tokens at their positions plus mask tokens at the query positions.

    The official code restores the full sequence with a gather by ids_restore; placing every
    token by its position embedding instead gives the same attention (a transformer without a
    causal mask does not see sequence order), and also serves `predict` on arbitrary positions.
    """

    def __init__(
        self,
        grid: int,
        embed_dim: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        patch_size: int,
        in_chans: int = 3,
    ):
        super().__init__()
        self.grid, self.width, self.depth, self.num_heads = grid, width, depth, num_heads
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_embed = nn.Linear(embed_dim, width)
        self.decoder_pos_embed = nn.Parameter(sincos_with_cls(width, grid), requires_grad=False)
        self.decoder_blocks = make_blocks(width, depth, num_heads, mlp_ratio, 0.0)
        self.decoder_norm = LayerNorm(width)
        self.decoder_pred = nn.Linear(width, patch_size * patch_size * in_chans)
        self.apply(init_mae_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def tokens(
        self,
        context: torch.Tensor,
        ctx_idx: torch.Tensor,
        tgt_idx: torch.Tensor | None,
        cls: torch.Tensor | None,
        extra: torch.Tensor | None,
    ) -> torch.Tensor:
        """The decoder's input sequence: [cls,] context, [extra,] [mask tokens at tgt_idx]."""
        pos = self.decoder_pos_embed[:, 1:].expand(context.size(0), -1, -1)
        parts = [self.decoder_embed(context) + gather_tokens(pos, ctx_idx)]
        if cls is not None:
            parts.insert(0, self.decoder_embed(cls) + self.decoder_pos_embed[:, :1])
        if extra is not None:
            parts.append(self.decoder_embed(extra))
        if tgt_idx is not None:
            parts.append(self.mask_token + gather_tokens(pos, tgt_idx))
        return torch.cat(parts, dim=1)

    def features(
        self,
        context: torch.Tensor,
        ctx_idx: torch.Tensor,
        tgt_idx: torch.Tensor | None = None,
        cls: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """decoder_norm outputs [B, Kc (+ Kt), width]: context positions, then query positions.

        context [B, Kc, D] are encoder patch tokens at ctx_idx [B, Kc]; cls [B, 1, D] is the
        encoder's cls token (the official decoder always has it); extra [B, T, D] are tokens
        without a position (task tokens). Outputs of cls and extra tokens are dropped.
        """
        x = self.tokens(context, ctx_idx, tgt_idx, cls, extra)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        start = 0 if cls is None else 1
        kept = x[:, start : start + context.size(1)]
        if tgt_idx is None:
            return kept
        return torch.cat([kept, x[:, -tgt_idx.size(1) :]], dim=1)

    def forward(
        self,
        context: torch.Tensor,
        ctx_idx: torch.Tensor,
        tgt_idx: torch.Tensor,
        cls: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pixel predictions [B, Kt, p*p*C] of the patches at tgt_idx.

        Only the query tokens reach the output, so the last block computes only theirs (as the
        JEPA predictor does): `decoder_pred(features(...)[:, -Kt:])` with less work.
        """
        x = blocks_on_tail(self.decoder_blocks, self.tokens(context, ctx_idx, tgt_idx, cls, extra), tgt_idx.size(1))
        return self.decoder_pred(self.decoder_norm(x))


class CropAndNoise:
    """A training view and its masking noise, both drawn under the sample's own seed.

    Per-sample noise (not per-batch) makes a sample's mask independent of how the batch is split
    over data-parallel ranks, and the same on resume.
    """

    def __init__(self, crop, num_patches: int):
        self.crop, self.num_patches = crop, num_patches

    def __call__(self, image) -> dict:
        view = self.crop(image)
        return {"image": view, "noise": torch.rand(self.num_patches)}


class MAE(Method):
    """MAE (arXiv 2111.06377): random masking, visible-only encoder, pixel-reconstruction decoder."""

    name = "mae"
    # No EMA target encoder: tasks evaluate the encoder unless told otherwise.
    default_encoder_key = "encoder"
    official_layout = "mae"
    official_pipeline = "mae"
    official_about = "an MAE checkpoint ({'model': ...})"
    # MAE's official linear probe reads the cls token (main_linprobe.py, --cls_token).
    probe_pools = ("mean", "cls")
    probe_pool = "cls"

    @classmethod
    def check_config(cls, method_cfg: dict, model_cfg: dict, image_size: int) -> None:
        check_predictor(method_cfg, model_cfg, heads_default=False)
        if not isinstance(method_cfg.get("norm_pix_loss"), bool):
            raise ValueError(f"method.norm_pix_loss must be true or false, got {method_cfg.get('norm_pix_loss')!r}")
        check_number(method_cfg, "mask_ratio")

    def __init__(self, model_cfg: dict, method_cfg: dict, image_size: int):
        super().__init__(model_cfg, method_cfg, image_size)
        self.check_config(method_cfg, model_cfg, image_size)
        self.encoder = MAEEncoder(
            image_size,
            model_cfg["patch_size"],
            model_cfg["embed_dim"],
            model_cfg["depth"],
            model_cfg["num_heads"],
            model_cfg.get("mlp_ratio", 4.0),
            model_cfg.get("drop_path", 0.0),
        )
        self.mask_ratio = float(method_cfg["mask_ratio"])
        # Fails early on a ratio that keeps nothing or removes nothing at this grid.
        random_masking(torch.zeros(1, self.encoder.num_patches), self.mask_ratio)
        self.predictor = self.new_predictor()

    @property
    def capabilities(self) -> Capabilities:
        # The decoder is a world model that takes no action; an encoder-only file has none.
        return Capabilities(predictor=self.predictor is not None, target_encoder=False, conditioned=False)

    @property
    def world_model_dim(self) -> int:
        return self.method_cfg["predictor"]["width"]

    @property
    def world_model_heads(self) -> int:
        return self.method_cfg["predictor"]["num_heads"]

    def probe_features(self, images, key, pool):
        if pool == "cls":
            return self.eval_encoder(key).cls_features(images)
        return super().probe_features(images, key, pool)

    def dense_features(self, images, key, blocks):
        encoder = self.eval_encoder(key)
        return encoder_levels(encoder, images, blocks, cls_token=encoder.cls_token)

    def new_predictor(self) -> MAEDecoder:
        p = self.method_cfg["predictor"]
        return MAEDecoder(
            self.encoder.grid,
            self.encoder.embed_dim,
            p["width"],
            p["depth"],
            p["num_heads"],
            self.model_cfg.get("mlp_ratio", 4.0),
            self.encoder.patch_size,
        )

    def train_transform(self):
        return CropAndNoise(
            crop_transform(self.image_size, self.method_cfg["crop_scale"], flip=self.method_cfg["flip"]),
            self.encoder.num_patches,
        )

    def collate(self, items: list) -> dict:
        views, labels, _ = zip(*items)
        return {
            "images": torch.stack([v["image"] for v in views]),
            "labels": torch.tensor(labels),
            "noise": torch.stack([v["noise"] for v in views]),
        }

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["images"]
        m = random_masking(batch["noise"], self.mask_ratio)
        latent = self.encoder.forward_with_cls(images, keep=m.keep)
        pred = self._decoder()(latent[:, 1:], m.keep, m.removed, cls=latent[:, :1])
        target = gather_tokens(patchify(images, self.encoder.patch_size), m.removed)
        if self.method_cfg["norm_pix_loss"]:
            target = normalize_patches(target)
        return {"loss": masked_pixel_loss(pred, target)}

    def _decoder(self) -> MAEDecoder:
        if self.predictor is None:
            raise ValueError(
                "this MAE has no decoder: it was loaded from an encoder-only checkpoint "
                "(the official *_full.pth / mae_visualize_*.pth files include one)"
            )
        return self.predictor

    def predict(self, context, ctx_idx, tgt_idx, action=None, extra=None):
        # MAE's world model takes no action: it only fills in what was removed.
        return self._decoder()(context, ctx_idx, tgt_idx, extra=extra)

    def predict_full(
        self, tokens: torch.Tensor, action: torch.Tensor | None = None, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decoder features [B, N, width] of a whole clean image: nothing masked, no mask token.

        `tokens` are the patch tokens [B, N, D] the eval encoder gives, or [B, 1 + N, D] from
        `encoder.forward_with_cls`, in which case the cls token is fed as in the official
        decoder; only patch positions are returned, after decoder_norm (before decoder_pred).
        """
        cls = None
        if tokens.size(1) == self.encoder.num_patches + 1:
            cls, tokens = tokens[:, :1], tokens[:, 1:]
        idx = torch.arange(tokens.size(1), device=tokens.device).expand(tokens.size(0), -1)
        return self._decoder().features(tokens, idx, cls=cls, extra=extra)

    # --- the official release layout -------------------------------------------------------------
    @classmethod
    def official_matches(cls, state: dict) -> bool:
        return isinstance(state.get("model"), dict)

    @staticmethod
    def _official_split(state: dict) -> tuple[dict, dict]:
        weights = strip_prefix(state["model"])
        decoder = {k: v for k, v in weights.items() if k.startswith(DECODER_PREFIXES)}
        return {k: v for k, v in weights.items() if k not in decoder}, decoder

    @classmethod
    def official_architecture(cls, state: dict, path: Path) -> dict[str, object]:
        encoder, decoder = cls._official_split(state)
        found = vit_architecture(encoder, 1, f"{path} 'model'")
        if decoder:
            found["method.predictor.width"] = tensor_shape(decoder, "decoder_embed.weight", f"{path} 'model'")[0]
            found["method.predictor.depth"] = count_blocks(decoder, "decoder_blocks.")
        return found

    def load_official(self, state: dict, path: Path) -> None:
        encoder, decoder = self._official_split(state)
        if isinstance(encoder.get("pos_embed"), torch.Tensor):
            encoder["pos_embed"] = resample_pos_embed(encoder["pos_embed"], self.grid, self.grid, 1)
        load_weights(self.encoder, encoder, f"{path} encoder")
        if decoder:
            if isinstance(decoder.get("decoder_pos_embed"), torch.Tensor):
                decoder["decoder_pos_embed"] = resample_pos_embed(decoder["decoder_pos_embed"], self.grid, self.grid, 1)
            load_weights(self.predictor, decoder, f"{path} decoder")
        else:
            # An encoder-only release: no decoder rather than a random one passed off as pretrained.
            self.predictor = None

    def to_official(self, checkpoint: dict, encoder_only: bool = False) -> dict:
        """{'model': encoder + decoder} (the `_full` layout), or the encoder alone."""
        weights = {k: v.clone() for k, v in self.encoder.state_dict().items()}
        if not encoder_only:
            if self.predictor is None:
                raise CheckpointError("this MAE has no decoder to export: use --encoder-only")
            weights.update({k: v.clone() for k, v in self.predictor.state_dict().items()})
        return {"model": weights}
