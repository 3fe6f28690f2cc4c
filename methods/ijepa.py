"""I-JEPA: predict the EMA encoder's latents of masked target blocks from a context block."""
from __future__ import annotations

import copy

import torch

from benchmark.core.data import crop_transform
from benchmark.core.schedules import linear
from methods.base import Method
from methods.losses import ema_update, latent_regression
from methods.masks import MaskConfig, MultiBlockMasker
from benchmark.core.layers import gather_tokens
from methods.vit import Predictor, VisionTransformer


def build_encoder(model_cfg: dict, image_size: int) -> VisionTransformer:
    return VisionTransformer(img_size=image_size, patch_size=model_cfg["patch_size"],
                             embed_dim=model_cfg["embed_dim"], depth=model_cfg["depth"],
                             num_heads=model_cfg["num_heads"], mlp_ratio=model_cfg.get("mlp_ratio", 4.0),
                             drop_path=model_cfg.get("drop_path", 0.0))


def build_predictor(encoder: VisionTransformer, model_cfg: dict, predictor_cfg: dict) -> Predictor:
    # Predictor heads default to the encoder's, as in the official code.
    return Predictor(num_patches=encoder.num_patches, grid=encoder.grid, embed_dim=encoder.embed_dim,
                     predictor_dim=predictor_cfg["width"], depth=predictor_cfg["depth"],
                     num_heads=predictor_cfg.get("num_heads") or encoder.num_heads,
                     mlp_ratio=model_cfg.get("mlp_ratio", 4.0),
                     conditioning=predictor_cfg.get("conditioning", "none"),
                     action_dim=predictor_cfg.get("action_dim", 0))


class IJEPA(Method):
    """I-JEPA (arXiv 2301.08243): multi-block masking, EMA target, latent regression."""
    name = "ijepa"

    def __init__(self, model_cfg: dict, method_cfg: dict, image_size: int):
        super().__init__(model_cfg, method_cfg, image_size)
        self.encoder = build_encoder(model_cfg, image_size)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.predictor = self.new_predictor()
        self.masker = MultiBlockMasker(self.encoder.grid, MaskConfig(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in method_cfg["mask"].items()}))
        self._ema_pairs: tuple[list, list] | None = None

    def train_transform(self):
        return crop_transform(self.image_size, self.method_cfg["crop_scale"], flip=self.method_cfg.get("flip", False))

    def collate(self, items: list) -> dict:
        views, labels, seeds = zip(*items)
        ctx_idx, tgt_idx = self.sample_masks(len(items), torch.Generator().manual_seed(seeds[0]))
        return {"images": torch.stack(views), "labels": torch.tensor(labels),
                "ctx_idx": ctx_idx, "tgt_idx": tgt_idx}

    def sample_masks(self, batch_size: int, gen: torch.Generator):
        return self.masker.sample(batch_size, gen)

    def targets(self, images: torch.Tensor, tgt_idx: list[torch.Tensor]) -> torch.Tensor:
        """Layer-normed EMA-encoder latents at every target block, stacked block-major."""
        with torch.no_grad():
            h = self.target_latents(images)
            return torch.cat([gather_tokens(h, idx) for idx in tgt_idx])

    def predict_blocks(self, context: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: list[torch.Tensor],
                       action: torch.Tensor | None = None) -> torch.Tensor:
        """One predictor pass for all target blocks: the context is repeated once per block."""
        n = len(tgt_idx)
        return self.predict(context.repeat(n, 1, 1), ctx_idx.repeat(n, 1), torch.cat(tgt_idx),
                            None if action is None else action.repeat(n, 1))

    def new_predictor(self) -> Predictor:
        return build_predictor(self.encoder, self.model_cfg, self.method_cfg["predictor"])

    def predict(self, context, ctx_idx, tgt_idx, action=None, extra=None):
        # An unconditioned predictor (plain I-JEPA) ignores the action; IWM's uses it.
        return self.predictor(context, ctx_idx, tgt_idx, action, extra)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        target = self.targets(batch["images"], batch["tgt_idx"])
        context = self.encode_context(batch["images"], batch["ctx_idx"])
        pred = self.predict_blocks(context, batch["ctx_idx"], batch["tgt_idx"])
        return {"loss": self._loss(pred, target)}

    def _loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return latent_regression(pred, target, self.method_cfg["loss"])

    def ema_momentum(self, progress: float) -> float:
        start, end = self.method_cfg["ema"]
        return linear(progress, 1.0, start, end)

    def after_step(self, progress: float) -> None:
        if self._ema_pairs is None:
            self._ema_pairs = (list(self.target_encoder.parameters()), list(self.encoder.parameters()))
        ema_update(*self._ema_pairs, self.ema_momentum(progress))
