"""IWM (arXiv 2403.00504): I-JEPA whose predictor is told what was done to the image.

Same encoder, EMA target, masking and optimisation as I-JEPA; what changes is the data and
the predictor. Each image gives a target view and a source view of one shared crop (see
benchmark/core/views.py); the encoder sees the masked SOURCE, the EMA target encoder sees the TARGET
view, and the predictor, conditioned on the action relating them, must predict the target
view's latents at the masked positions. L2 on layer-normed targets by default.
"""

from __future__ import annotations

import torch

from benchmark.core.views import ACTION_DIM, PairedViews, ViewConfig
from methods.ijepa import IJEPA


class IWM(IJEPA):
    """Image World Model: I-JEPA with paired views and an action-conditioned predictor."""

    name = "iwm"
    # Its step (paired views, a conditioned predictor) is not the official I-JEPA one.
    official_step = None
    official_pipeline = None  # two augmented views per image: no official code builds them

    def __init__(self, model_cfg: dict, method_cfg: dict, image_size: int):
        predictor = dict(method_cfg["predictor"], action_dim=ACTION_DIM)
        super().__init__(model_cfg, dict(method_cfg, predictor=predictor), image_size)
        views = {k: tuple(v) if isinstance(v, list) else v for k, v in method_cfg["views"].items()}
        self.view_cfg = ViewConfig(image_size=image_size, **views)

    def train_transform(self):
        return PairedViews(self.view_cfg)

    def collate(self, items: list) -> dict:
        views, labels, seeds = zip(*items)
        ctx_idx, tgt_idx = self.sample_masks(len(items), torch.Generator().manual_seed(seeds[0]))
        return {
            "target": torch.stack([v["target"] for v in views]),
            "source": torch.stack([v["source"] for v in views]),
            "action": torch.stack([v["action"] for v in views]),
            "labels": torch.tensor(labels),
            "ctx_idx": ctx_idx,
            "tgt_idx": tgt_idx,
        }

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        target = self.targets(batch["target"], batch["tgt_idx"])
        context = self.encode_context(batch["source"], batch["ctx_idx"])
        pred = self.predict_blocks(context, batch["ctx_idx"], batch["tgt_idx"], batch["action"])
        return {"loss": self._loss(pred, target)}
