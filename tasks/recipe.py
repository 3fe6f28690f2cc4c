"""The finetuning recipe every adapter and multitask tuning share: its settings (each declared
with its type and range, checked before compute), its lr and weight-decay schedules, and label
smoothing with mixup / cutmix on images or on a frozen encoder's token grid.

The settings are MAE's finetuning recipe with what the other official evaluations add (V-JEPA's
attentive probe: a cosine weight-decay schedule, schedules stepped ahead, bilinear val resize);
docs/tasks.md has each paper preset's table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from benchmark.core.errors import ConfigError
from benchmark.core.schedules import cosine, warmup_cosine
from benchmark.core.transforms import INTERPOLATIONS, recipe_transform
from tasks.base import Choice, Flag, Number, Numbers
from tasks.core import PRECISIONS
from tasks.heads import HEADS
from tasks.mixing import mix


def as_grid(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Tokens [B, N, D] on a square patch grid as [B, D, h, w] (so cutmix swaps patches), and back."""
    if x.dim() == 4:
        return x, lambda y: y
    side = math.isqrt(x.size(1))
    if side * side != x.size(1):
        return x.transpose(1, 2).unsqueeze(-1), lambda y: y.squeeze(-1).transpose(1, 2)
    grid = x.transpose(1, 2).reshape(x.size(0), x.size(2), side, side)
    return grid, lambda y: y.flatten(2).transpose(1, 2)


def mixed(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: dict, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and soft targets after label smoothing and mixup/cutmix (on the token grid for tokens)."""
    grid, back = as_grid(x)
    grid, targets = mix(
        grid,
        y,
        num_classes,
        cfg["label_smoothing"],
        cfg["mixup"],
        cfg["cutmix"],
        cfg["mix_prob"],
        cfg["switch_prob"],
        gen,
    )
    return back(grid), targets


def lr_schedule(cfg: dict, steps_per_epoch: int) -> tuple[int, Callable[[int], float]]:
    """(total steps, lr at a step): linear warmup from 0, then cosine to min_lr, per step, read
    `schedule_offset` steps ahead."""
    total = cfg["epochs"] * steps_per_epoch
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    ahead = cfg["schedule_offset"]
    return total, lambda step: warmup_cosine(step + ahead, total, warmup, 0.0, cfg["lr"], cfg["min_lr"])


def wd_schedule(cfg: dict, total: int) -> Callable[[int], float] | None:
    """Weight decay at a step: cosine from weight_decay to final_weight_decay (None: constant)."""
    if cfg["final_weight_decay"] is None:
        return None
    start, final, ahead = cfg["weight_decay"], cfg["final_weight_decay"], cfg["schedule_offset"]
    return lambda step: cosine(step + ahead, total, start, final)


@dataclass(frozen=True)
class AugmentPolicy:
    """A timm RandAugment / AutoAugment / AugMix policy string (checked by timm's own parser), or null."""

    def problem(self, value) -> str | None:
        if value is None:
            return None
        try:
            if not isinstance(value, str) or not value:
                raise ValueError
            recipe_transform(32, (0.5, 1.0), False, value, 0.0, "pixel", 1)
        except (AssertionError, ValueError, KeyError):
            return "must be a timm augmentation policy (e.g. rand-m9-mstd0.5-inc1, original) or null"
        return None


# The finetuning recipe's settings (shared by every adapter and multitask tuning).
PROBABILITY = Number(0, 1)
INPUTS = ("tokens", "images")
RECIPE = {
    "epochs": Number(1, integer=True),
    "batch_size": Number(1, integer=True),
    "train_samples": Number(1, integer=True, nullable=True),
    "warmup_epochs": Number(0),
    "lr": Number(0, low_open=True),
    "min_lr": Number(0),
    "betas": Numbers(Number(0, 1, high_open=True)),
    "weight_decay": Number(0),
    # Cosine weight-decay schedule from weight_decay to this at the last step; null: constant.
    "final_weight_decay": Number(0, nullable=True),
    # Steps the lr and weight-decay schedules run ahead of the iteration count (V-JEPA's eval
    # steps its schedulers once before each iteration, so its first iteration reads step 1).
    "schedule_offset": Number(0, integer=True),
    "label_smoothing": PROBABILITY,
    "mixup": Number(0),
    "cutmix": Number(0),
    "mix_prob": PROBABILITY,
    "switch_prob": PROBABILITY,
    "clip_grad": Number(0),
    "precision": Choice(PRECISIONS),
    "head": Choice(HEADS),
    # Attention heads of an attentive head; null: as many as the network whose tokens it reads
    # (V-JEPA's probe takes the encoder's).
    "head_heads": Number(1, integer=True, nullable=True),
    # Std of the head's final linear weights (trunc-normal, bias 0); null: the head's own init.
    "head_init_std": Number(0, low_open=True, nullable=True),
    # What a frozen encoder's head trains on: its cached tokens of the centre crops, or augmented
    # images run through it every step (an encoder that is trained always sees images).
    "inputs": Choice(INPUTS),
    # The training images' augmentation (inputs: images).
    "crop_scale": Numbers(Number(0, 1, low_open=True)),
    "flip": Flag(),
    # timm RandAugment / AutoAugment policy (rand-m9-mstd0.5-inc1, original) or null; random
    # erasing probability, mode (const, rand, pixel) and count per image.
    "auto_augment": AugmentPolicy(),
    "reprob": PROBABILITY,
    "remode": Choice(("const", "rand", "pixel")),
    "recount": Number(1, integer=True),
    # The resize before the val centre crop (inputs: images).
    "eval_interpolation": Choice(INTERPOLATIONS),
}
ENCODER_RECIPE = {
    **RECIPE,
    "drop_path": PROBABILITY,
    "layer_decay": Number(0, 1, low_open=True, nullable=True),
    # The position table is trained (MAE finetuning) or stays the fixed sin-cos one.
    "train_pos_embed": Flag(),
    # The encoder's final norm before the head, or none: MAE's global-pool model deletes it and
    # normalises the pooled vector once, in the head (fc_norm).
    "final_norm": Flag(),
}
PREDICTOR_RECIPE = {**RECIPE, "drop_path": PROBABILITY, "predictor_lr_scale": Number(0, low_open=True)}


def check_blocks(name: str, cfg: dict, network: nn.Module, what: str, layer_decay: bool = True) -> None:
    """Layer decay and stochastic depth act on a network's timm transformer blocks: on one without
    any they would silently do nothing, so asking for them is an error."""
    if any(isinstance(m, Block) for m in network.modules()):
        return
    decay = cfg.get("layer_decay") if layer_decay else None
    if decay is not None and decay != 1.0:
        raise ConfigError(
            f"tasks.{name}.layer_decay={decay}: {what} has no transformer blocks to decay the lr over (set it to null)"
        )
    if cfg.get("drop_path"):
        raise ConfigError(
            f"tasks.{name}.drop_path={cfg['drop_path']}: {what} has no transformer blocks to drop (set it to 0)"
        )


def head_heads(cfg: dict, source_heads: int) -> int:
    """The attentive head's heads: the setting, or null for those of the network behind the tokens."""
    return cfg["head_heads"] if cfg["head_heads"] is not None else source_heads


def check_head(name: str, cfg: dict, width: int, source_heads: int) -> None:
    """An attentive head splits the width of the tokens it reads over its heads."""
    heads = head_heads(cfg, source_heads)
    if cfg["head"] == "attentive" and width % heads:
        raise ConfigError(
            f"tasks.{name}.head_heads={heads} does not divide the width {width} of the tokens the head "
            f"reads (null takes the {source_heads} heads of the network that made them)"
        )
