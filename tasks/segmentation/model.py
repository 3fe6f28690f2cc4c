"""The segmentation network of each mode, built from a copy of a method through its contract.

Modes (what trains; the head always trains):
- frozen:     nothing but the head (the linear-probe protocol on frozen features);
- encoder:    the evaluation encoder; the head sits on its intermediate blocks;
- predictor:  the predictor, on a frozen encoder: `method.predict_full(tokens)` (the world model
              on the whole clean image, null action) feeds the head;
- end_to_end: encoder and predictor, same features as `predictor`.
The method is deep-copied first: finetuning never changes the weights later tasks evaluate.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Method
from tasks.segmentation import heads
from tasks.segmentation.backbone import SCALES, Pyramid, ViTLevels, tokens_to_map

MODES = ("frozen", "encoder", "predictor", "end_to_end")
HEADS = ("linear", "upernet")
TRAINS = {"frozen": (False, False), "encoder": (True, False), "predictor": (False, True), "end_to_end": (True, True)}
AUX_LEVEL = 2  # the stride-16 level (block 8 of ViT-B), as in the BEiT/MAE mmseg configs


class Segmenter(nn.Module):
    def __init__(self, method: Method, encoder_key: str, mode: str, head: str, num_classes: int, cfg: dict,
                 backend: str):
        super().__init__()
        self.mode, self.head_kind = mode, head
        self.method = copy.deepcopy(method).requires_grad_(False)
        if cfg["random_predictor"] and self.uses_predictor:
            self.method.predictor = self.method.new_predictor().requires_grad_(False)
        self.encoder = self.method.eval_encoder(encoder_key)
        self.train_encoder, self.train_predictor = TRAINS[mode]
        self.encoder.requires_grad_(self.train_encoder)
        # Fixed position tables stay fixed even when the rest of the encoder trains.
        for name, p in self.encoder.named_parameters():
            if name.endswith("pos_embed"):
                p.requires_grad_(False)
        if self.uses_predictor:
            self.method.predictor.requires_grad_(self.train_predictor)
            for name, p in self.method.predictor.named_parameters():
                if name.endswith("pos_embed"):
                    p.requires_grad_(False)
        self.levels = ViTLevels(self.encoder, cfg.get("feature_blocks"))
        dim = self.levels.dim
        self.pyramid = Pyramid(dim) if head == "upernet" else None
        if head == "linear":
            self.head, self.aux = heads.LinearHead(dim, num_classes), None
        elif backend == "mmseg":
            from tasks.segmentation import mmseg_backend as mm
            self.head = mm.uper_head([dim] * len(SCALES), cfg["channels"], num_classes, tuple(cfg["pool_scales"]),
                                     cfg["dropout"])
            self.aux = mm.fcn_head(dim, cfg["aux_channels"], num_classes, cfg["dropout"]) if cfg["aux_weight"] else None
        else:
            self.head = heads.UperNetHead([dim] * len(SCALES), cfg["channels"], num_classes,
                                          tuple(cfg["pool_scales"]), cfg["dropout"])
            self.aux = heads.FCNHead(dim, cfg["aux_channels"], num_classes, cfg["dropout"]) if cfg["aux_weight"] else None

    @property
    def uses_predictor(self) -> bool:
        return self.mode in ("predictor", "end_to_end")

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen networks stay in eval mode: no drop-path, no dropout, no statistics updates.
        if mode and not self.train_encoder:
            self.encoder.eval()
        if mode and self.uses_predictor and not self.train_predictor:
            self.method.predictor.eval()
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """The backbone: four levels at strides patch/4..2*patch (upernet) or one grid (linear)."""
        if self.uses_predictor:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
                _, last = self.levels(images)
            h, w = last.shape[-2:]
            predicted = tokens_to_map(self.method.predict_full(last.flatten(2).transpose(1, 2)), h, w)
            return predicted if self.pyramid is None else self.pyramid([predicted] * len(SCALES))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            blocks, last = self.levels(images)
        return last if self.pyramid is None else self.pyramid(blocks)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, auxiliary logits or None), both at the input resolution."""
        feats = self.features(images)
        logits = self.head(feats)
        aux = self.aux(feats[AUX_LEVEL]) if self.aux is not None and self.training else None
        return upsample(logits, images), None if aux is None else upsample(aux, images)

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float, predictor_lr_scale: float) -> list[dict]:
        """AdamW groups: encoder lr decayed by depth (BEiT), no decay on biases / 1-D tensors."""
        groups: dict[tuple, dict] = {}

        def add(p: torch.nn.Parameter, name: str, scale: float) -> None:
            wd = 0.0 if p.ndim <= 1 or name.endswith(".bias") or name.endswith("token") else weight_decay
            group = groups.setdefault((scale, wd), {"params": [], "lr_scale": scale, "weight_decay": wd, "lr": lr * scale})
            group["params"].append(p)

        depth = len(self.encoder.blocks) + 1
        if self.train_encoder:
            for name, p in self.encoder.named_parameters():
                if p.requires_grad:
                    add(p, name, layer_decay ** (depth - layer_id(name, depth)))
        if self.uses_predictor and self.train_predictor:
            for name, p in self.method.predictor.named_parameters():
                if p.requires_grad:
                    add(p, name, predictor_lr_scale)
        for module in (self.pyramid, self.head, self.aux):
            if module is not None:
                for name, p in module.named_parameters():
                    add(p, name, 1.0)
        return list(groups.values())


def upsample(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth for what follows the last block."""
    if name.startswith(("patch_embed", "pos_embed", "cls_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth
