"""The segmentation network of each mode, built from a copy of a method through its contract.

Modes (what trains; the head always trains):
- frozen:     nothing but the head (the linear-probe protocol on frozen features);
- encoder:    the evaluation encoder; the head sits on its intermediate blocks;
- predictor:  the predictor, on a frozen encoder: `method.predict_full(tokens)` (the world model
              on the whole clean image, null action) feeds the head;
- end_to_end: encoder and predictor, same features as `predictor`.
The method is deep-copied first: finetuning never changes the weights later tasks evaluate.

A training encoder gets what mmseg's MAE backbone recipe sets (each optional): a drop-path
rate, layer scale, relative position bias, a trained position table on the crop's grid. Its
optimiser groups follow mmseg's LayerDecayOptimizerConstructor (see `param_groups`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.core.layers import tokens_to_map
from benchmark.core.optim import param_groups
from benchmark.core.seeding import derive_seed
from methods.base import Method
from tasks.core import RANDOM_PREDICTOR_SEED, set_drop_path, train_like
from tasks.segmentation import heads
from tasks.segmentation.backbone import (
    SCALES,
    Pyramid,
    add_layer_scale,
    add_rel_pos_bias,
    level_blocks,
    train_pos_table,
)

MODES = ("frozen", "encoder", "predictor", "end_to_end")
HEADS = ("linear", "upernet")
TRAINS = {"frozen": (False, False), "encoder": (True, False), "predictor": (False, True), "end_to_end": (True, True)}
AUX_LEVEL = 2  # the stride-16 level (block 8 of ViT-B), as in the BEiT/MAE mmseg configs


def uses_predictor(mode: str) -> bool:
    return mode in ("predictor", "end_to_end")


class Segmenter(nn.Module):
    def __init__(
        self,
        method: Method,
        encoder_key: str,
        mode: str,
        head: str,
        num_classes: int,
        cfg: dict,
        backend: str,
        seed: int = 0,
    ):
        super().__init__()
        self.mode, self.head_kind, self.encoder_key = mode, head, encoder_key
        self.train_encoder, self.train_predictor = TRAINS[mode]
        self.method = copy.deepcopy(method).requires_grad_(False)
        if self.train_encoder:
            encoder = self.method.eval_encoder(encoder_key)
            train_like(encoder, method.encoder)
            if cfg["drop_path"] is not None:
                set_drop_path(encoder, cfg["drop_path"])
            grid = cfg["crop_size"] // method.patch_size
            if cfg["layer_scale"] is not None:
                add_layer_scale(encoder, cfg["layer_scale"])
            if cfg["rel_pos_bias"]:
                add_rel_pos_bias(encoder, grid)
            if cfg["train_pos_embed"]:
                train_pos_table(encoder, grid)
        if uses_predictor(mode):
            # Both predictor modes train it: a fresh one for the random-predictor control.
            if cfg["random_predictor"]:
                self.method.reset_predictor(derive_seed(seed, RANDOM_PREDICTOR_SEED))
            else:
                train_like(self.method.predictor, method.predictor)
        self.blocks = level_blocks(method.depth, cfg.get("feature_blocks"))
        dim = method.world_model_dim if uses_predictor(mode) else method.token_dim
        self.pyramid = Pyramid(dim) if head == "upernet" else None
        if head == "linear":
            self.head, self.aux = heads.LinearHead(dim, num_classes), None
        elif backend == "mmseg":
            from tasks.segmentation import mmseg_backend as mm

            self.head = mm.uper_head(
                [dim] * len(SCALES), cfg["channels"], num_classes, tuple(cfg["pool_scales"]), cfg["dropout"]
            )
            self.aux = mm.fcn_head(dim, cfg["aux_channels"], num_classes, cfg["dropout"]) if cfg["aux_weight"] else None
        else:
            self.head = heads.UperNetHead(
                [dim] * len(SCALES), cfg["channels"], num_classes, tuple(cfg["pool_scales"]), cfg["dropout"]
            )
            self.aux = (
                heads.FCNHead(dim, cfg["aux_channels"], num_classes, cfg["dropout"]) if cfg["aux_weight"] else None
            )
            if cfg["head_init"] == "mmseg":
                for module in (self.head, self.aux):
                    if module is not None:
                        heads.init_like_mmseg(module)

    @property
    def encoder(self) -> nn.Module:
        return self.method.eval_encoder(self.encoder_key)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen networks stay in eval mode: no drop-path, no dropout, no statistics updates.
        if mode:
            self.method.eval()
            if self.train_encoder:
                self.encoder.train()
            if uses_predictor(self.mode) and self.train_predictor:
                self.method.predictor.train()
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """The backbone: four levels at strides patch/4..2*patch (upernet) or one grid (linear)."""
        wanted = [] if uses_predictor(self.mode) else self.blocks
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            levels, last = self.method.dense_features(images, self.encoder_key, wanted)
        if uses_predictor(self.mode):
            h, w = last.shape[-2:]
            last = tokens_to_map(self.method.predict_full(last.flatten(2).transpose(1, 2)), h, w)
            levels = [last] * len(SCALES)
        return last if self.pyramid is None else self.pyramid(levels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, auxiliary logits or None), both at the input resolution."""
        feats = self.features(images)
        logits = self.head(feats)
        aux = self.aux(feats[AUX_LEVEL]) if self.aux is not None and self.training else None
        return upsample(logits, images), None if aux is None else upsample(aux, images)

    def param_groups(self, weight_decay: float, layer_decay: float, predictor_lr_scale: float) -> list[dict]:
        """AdamW groups: encoder lr decayed by depth (BEiT), predictor at its own scale, heads at 1.

        As mmseg's layer-decay constructor: the encoder's tokens and position table are decayed
        (its no-decay names never match a backbone's), and a parameter that never reaches the
        loss is left out: the final norm, when the UperNet levels are raw block outputs (mmseg's
        MAE backbone has no final norm)."""
        groups = []
        if self.train_encoder:
            norm = getattr(self.encoder, "norm", None)
            unused = set()
            if norm is not None and self.pyramid is not None and not uses_predictor(self.mode):
                unused = {id(p) for p in norm.parameters()}
            named = [(n, p) for n, p in self.encoder.named_parameters() if id(p) not in unused]
            groups += param_groups(self.encoder, weight_decay, layer_decay=layer_decay, tokens=False, named=named)
        if uses_predictor(self.mode) and self.train_predictor:
            groups += param_groups(self.method.predictor, weight_decay, predictor_lr_scale)
        for module in (self.pyramid, self.head, self.aux):
            if module is not None:
                groups += param_groups(module, weight_decay)
        return groups


def upsample(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
