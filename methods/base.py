"""The contract every pretraining method fulfils, so tasks and the trainer never name a method.

A method is an nn.Module holding its networks and knowing how to:
- build its training views and batches (`train_transform`, `collate`),
- compute its loss on a batch (`training_step`) and update what is not trained by gradient
  (`after_step`, e.g. the EMA target encoder),
- call its predictor (`predict` on given positions, `predict_full` on a whole clean image),
  build a fresh one (`new_predictor`, the random-predictor control), and hand out the encoder
  an evaluation should use (`eval_encoder(key)`, patch tokens [B, N, D] out).
Checkpoints hold the method's name and architecture next to its weights, so `Method.load`
rebuilds the right class without the config that trained it.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from methods.losses import normalize_targets

ENCODER_KEYS = ("target_encoder", "encoder")


class Method(nn.Module, metaclass=ABCMeta):
    name: ClassVar[str]
    # The encoder tasks evaluate when the user names none (checkpoint_key=null).
    default_encoder_key: ClassVar[str] = "target_encoder"
    encoder: nn.Module
    target_encoder: nn.Module | None
    predictor: nn.Module | None

    def __init__(self, model_cfg: dict, method_cfg: dict, image_size: int):
        super().__init__()
        # Plain dicts: saved with every checkpoint and enough to rebuild the networks.
        self.model_cfg, self.method_cfg, self.image_size = dict(model_cfg), dict(method_cfg), image_size
        self.target_encoder = None
        self.predictor = None

    # --- data -----------------------------------------------------------------------------
    @abstractmethod
    def train_transform(self) -> Callable:
        """PIL image -> training view(s); random choices come from torch's global RNG."""

    @abstractmethod
    def collate(self, items: list) -> dict:
        """(view, label, batch_seed) items -> a batch dict; batch-level randomness from batch_seed."""

    # --- training -------------------------------------------------------------------------
    @abstractmethod
    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward pass and loss; returns at least {'loss': scalar tensor}."""

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with progress in [0, 1] (EMA updates etc.)."""

    def param_groups(self) -> list[dict]:
        """AdamW groups: weight decay on matrices only, never on biases or 1-D parameters."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:  # frozen: fixed position tables, the EMA target encoder
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]

    # --- evaluation -------------------------------------------------------------------------
    @abstractmethod
    def predict(self, context: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor,
                action: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted latents at tgt_idx [B, Kt] from context tokens at ctx_idx [B, Kc].

        `extra` [B, T, D]: tokens in the encoder's space added to the predictor's input with no
        position (multitask predictor tuning's task tokens); the output is unchanged in shape.
        """

    def sample_masks(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Context positions [B, Kc] and target blocks (a list of [B, Kt]) as in pretraining."""
        raise ValueError(f"method {self.name} does not draw context/target blocks")

    def encode_context(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder tokens of the patches at positions keep [B, K] only (a masked view)."""
        return self.encoder(images, keep=keep)

    def target_latents(self, images: torch.Tensor) -> torch.Tensor:
        """What the predictor is trained to match: layer-normed target-encoder tokens [B, N, D]."""
        if self.target_encoder is None:
            raise ValueError(f"method {self.name} has no target encoder, so no latent targets")
        return normalize_targets(self.target_encoder(images))

    def predict_full(self, tokens: torch.Tensor, action: torch.Tensor | None = None,
                     extra: torch.Tensor | None = None) -> torch.Tensor:
        """The world model run on a whole clean image: predictions [B, N, D'] at every position.

        `tokens` [B, N, D] are the encoder's patch tokens of the full image; the predictor gets
        all of them as context and a query at every position, with the null action unless one is
        given, plus the `extra` tokens (see `predict`). This is what predictor finetuning and
        dense tasks put their heads on.
        """
        idx = torch.arange(tokens.size(1), device=tokens.device).expand(tokens.size(0), -1)
        return self.predict(tokens, idx, idx, action, extra)

    @abstractmethod
    def new_predictor(self) -> nn.Module:
        """A freshly initialised predictor of the same architecture (the random-predictor control)."""

    def eval_encoder(self, key: str = "target_encoder") -> nn.Module:
        if key not in ENCODER_KEYS:
            raise ValueError(f"unknown encoder key {key!r} (choose {' or '.join(ENCODER_KEYS)})")
        if key == "target_encoder" and self.target_encoder is None:
            raise ValueError(f"method {self.name} has no target encoder: use checkpoint_key=encoder")
        return self.target_encoder if key == "target_encoder" else self.encoder

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {"method": self.name, "model_cfg": self.model_cfg, "method_cfg": self.method_cfg,
                "image_size": self.image_size, "weights": self.state_dict()}
