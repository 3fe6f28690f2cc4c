"""Finetuning adapters on a pretrained method, and the training loop they share.

Each adapter is a point in one grid: is the encoder trained, is the world model (the method's
predictor, through `method.predict_full`) between encoder and head, and is that predictor the
pretrained one or a fresh one of the same architecture:

    task                 encoder   predictor          head on
    attentive            frozen    -                  encoder tokens (tasks/attentive.py)
    encoder_ft           trained   -                  encoder tokens
    predictor_ft         frozen    pretrained, tuned  predictor outputs
    predictor_ft_random  frozen    fresh, tuned       predictor outputs
    end_to_end           trained   pretrained, tuned  predictor outputs

Training never touches the method a run holds: the adapter works on a copy in which every
module it trains is duplicated and every frozen one is shared. A frozen encoder's tokens come
from the run's token cache (tasks/base.py) when they fit in memory; a trained encoder sees
augmented images. Recipe (MAE finetuning): AdamW, warmup + cosine per step, layer-wise lr decay
over the encoder's blocks, drop-path, label smoothing, mixup/cutmix; top-1 on the val split after
the last epoch (nothing is selected on val).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Subset

from benchmark.core.data import crop_transform, eval_loader, stack_views, train_loader
from benchmark.core.errors import ConfigError
from benchmark.core.layers import to_device
from benchmark.core.optim import count_parameters, param_groups
from benchmark.core.schedules import warmup_cosine
from benchmark.core.seeding import derive_seed, seeded
from benchmark.core.stats import Evidence
from methods.base import Method
from tasks.base import Applies, Choice, Flag, Number, Numbers, Task, TaskContext
from tasks.core import (
    HEAD_SEED,
    MIX_SEED,
    RANDOM_PREDICTOR_SEED,
    TRAIN_POOL_SEED,
    loss_summary,
    set_drop_path,
    train,
    train_like,
    working_copy,
)
from tasks.heads import HEADS, build_head
from tasks.mixing import mix, soft_cross_entropy, soft_targets

Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


# --- the model being tuned -------------------------------------------------------------------------
class Classifier(nn.Module):
    """[trained encoder] -> [world model on the whole clean image] -> head.

    Without an encoder the inputs are already the frozen encoder's tokens. Modules listed in
    `frozen` (the ones shared with the run's method) stay in eval mode whatever mode the
    classifier is put in.
    """

    def __init__(
        self,
        head: nn.Module,
        encoder: nn.Module | None = None,
        world_model: Method | None = None,
        frozen: tuple[nn.Module, ...] = (),
    ):
        super().__init__()
        self.head, self.encoder, self.world_model = head, encoder, world_model
        self.frozen = frozen

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if self.encoder is not None:
            x = self.encoder(x)
        if self.world_model is not None:
            x = self.world_model.predict_full(x, extra=extra)
        return self.head(x)


# --- the loop ----------------------------------------------------------------------------------------
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
        soft_targets(y, num_classes, cfg["label_smoothing"]),
        cfg["mixup"],
        cfg["cutmix"],
        cfg["mix_prob"],
        cfg["switch_prob"],
        gen,
    )
    return back(grid), targets


def lr_schedule(cfg: dict, steps_per_epoch: int) -> tuple[int, Callable[[int], float]]:
    """(total steps, lr at a step): linear warmup from 0, then cosine to min_lr, per step."""
    total = cfg["epochs"] * steps_per_epoch
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    return total, lambda step: warmup_cosine(step, total, warmup, 0.0, cfg["lr"], cfg["min_lr"])


def train_classifier(
    model: Classifier,
    groups: list[dict],
    train_batches: Batches,
    steps_per_epoch: int,
    num_classes: int,
    cfg: dict,
    seed: int,
    device: torch.device,
    label: str,
    show_progress: bool = False,
) -> dict:
    """Train the parameters in `groups` for cfg['epochs'] epochs; returns loss statistics."""
    total, lr_at = lr_schedule(cfg, steps_per_epoch)
    gen = torch.Generator().manual_seed(derive_seed(seed, MIX_SEED))

    def batches():
        for epoch in range(cfg["epochs"]):
            yield from train_batches(epoch)

    def loss(batch):
        x, targets = mixed(*batch, num_classes, cfg, gen)
        return soft_cross_entropy(model(x), targets.to(device))

    model.to(device).train()
    losses = train(
        groups,
        batches(),
        total,
        lr_at,
        loss,
        betas=cfg["betas"],
        clip_grad=cfg["clip_grad"],
        device=device,
        bf16=bool(cfg["bf16"]),
        label=label,
        show_progress=show_progress,
    )
    model.eval()
    return loss_summary(losses, steps_per_epoch)


def evaluate(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device, bf16: bool
) -> np.ndarray:
    """Whether each sample, in order, is classified right (top-1)."""
    correct = []
    model.eval()
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        for x, y in batches:
            correct.append((model(x).argmax(dim=-1).cpu() == y.cpu()).numpy())
    return np.concatenate(correct) if correct else np.zeros(0, dtype=bool)


# --- inputs ----------------------------------------------------------------------------------------
def train_pool(n: int, limit: int | None, seed: int) -> torch.Tensor:
    """Indices of the training samples used: all, or a seeded subset of `limit` (sorted)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def frozen_inputs(
    method: Method,
    ctx: TaskContext,
    split: str,
    labels: torch.Tensor,
    batch_size: int,
    seed: int | None,
    pool: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Frozen-encoder tokens and labels of the samples in `pool` (default all); shuffled per `seed`
    (train, full batches only) or in order (val)."""
    pool = torch.arange(len(labels)) if pool is None else pool
    n = len(pool)
    if seed is None:
        order = pool
    else:
        order = pool[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n - n % batch_size]]
    for tokens, idx in ctx.token_batches(method, split, order, batch_size):
        yield tokens, labels[idx].to(ctx.device)


def image_inputs(
    ctx: TaskContext, cfg: dict, seed: int, column: str | None, pool: torch.Tensor
) -> tuple[Batches, int, Callable]:
    """Augmented training images (RandomResizedCrop + flip) of the samples in `pool`, their steps
    per epoch, and val images, labelled by `column` (default: the data's label)."""
    source = ctx.source if column is None else replace(ctx.source, label_column=column)
    dataset = Subset(source.split("train"), pool.tolist())
    transform = crop_transform(source.image_size, cfg["crop_scale"], flip=cfg["flip"])

    def train_images(epoch: int):
        loader = train_loader(dataset, transform, stack_views, cfg["batch_size"], seed, epoch, workers=ctx.workers)
        for batch in loader:
            batch = to_device(batch, ctx.device)
            yield batch["images"], batch["labels"]

    def val():
        loader = eval_loader(source.split("val"), source.image_size, cfg["batch_size"], ctx.workers)
        for batch in loader:
            batch = to_device(batch, ctx.device)
            yield batch["images"], batch["labels"]

    return train_images, len(dataset) // cfg["batch_size"], val


# --- the adapters --------------------------------------------------------------------------------------
# The finetuning recipe's settings (shared by every adapter and multitask tuning).
PROBABILITY = Number(0, 1)
RECIPE = {
    "epochs": Number(1, integer=True),
    "batch_size": Number(1, integer=True),
    "train_samples": Number(1, integer=True, nullable=True),
    "warmup_epochs": Number(0),
    "lr": Number(0, low_open=True),
    "min_lr": Number(0),
    "betas": Numbers(Number(0, 1, high_open=True)),
    "weight_decay": Number(0),
    "label_smoothing": PROBABILITY,
    "mixup": Number(0),
    "cutmix": Number(0),
    "mix_prob": PROBABILITY,
    "switch_prob": PROBABILITY,
    "clip_grad": Number(0),
    "bf16": Flag(),
    "head": Choice(HEADS),
    "head_heads": Number(1, integer=True),
}
ENCODER_RECIPE = {
    **RECIPE,
    "drop_path": PROBABILITY,
    "layer_decay": Number(0, 1, low_open=True, nullable=True),
    "crop_scale": Numbers(Number(0, 1, low_open=True)),
    "flip": Flag(),
}
PREDICTOR_RECIPE = {**RECIPE, "drop_path": PROBABILITY, "predictor_lr_scale": Number(0, low_open=True)}


def check_head(name: str, cfg: dict, width: int) -> None:
    """An attentive head splits the width of the tokens it reads over its heads."""
    if cfg["head"] == "attentive" and width % cfg["head_heads"]:
        raise ConfigError(
            f"tasks.{name}.head_heads={cfg['head_heads']} does not divide the width {width} of the "
            f"tokens the head reads"
        )


class Finetune(Task):
    """Shared by the finetuning adapters; subclasses say what is trained."""

    train_encoder = False
    use_predictor = False
    random_predictor = False
    settings = RECIPE

    def applies_to(self, method: Method) -> Applies:
        return Applies.needs(method, predictor=self.use_predictor)

    def check(self, method: Method) -> None:
        check_head(self.name, self.cfg, method.world_model_dim if self.use_predictor else method.token_dim)

    def build(
        self, method: Method, ctx: TaskContext, num_classes: int, seed: int
    ) -> tuple[Classifier, list[dict], Method]:
        """The classifier, its optimiser groups, and the working copy of the method it uses."""
        cfg = self.cfg
        original = method.eval_encoder(ctx.encoder_key)
        tune_predictor = self.use_predictor and not self.random_predictor
        work = working_copy(
            method, [m for m, on in ((original, self.train_encoder), (method.predictor, tune_predictor)) if on]
        )
        encoder = work.eval_encoder(ctx.encoder_key)
        if self.random_predictor:
            work.reset_predictor(derive_seed(seed, RANDOM_PREDICTOR_SEED))
        with seeded(derive_seed(seed, HEAD_SEED)):
            width = work.world_model_dim if self.use_predictor else work.token_dim
            head = build_head(cfg["head"], width, num_classes, cfg["head_heads"])
        groups = param_groups(head, cfg["weight_decay"])
        if self.use_predictor:
            set_drop_path(work.predictor, cfg["drop_path"])
            groups += param_groups(work.predictor, cfg["weight_decay"], cfg["predictor_lr_scale"])
        if self.train_encoder:
            train_like(encoder, method.encoder)
            set_drop_path(encoder, cfg["drop_path"])
            groups += param_groups(encoder, cfg["weight_decay"], layer_decay=cfg["layer_decay"])
        frozen = tuple(
            m
            for m in (work.encoder, work.target_encoder, work.predictor)
            if m is not None
            and not (m is encoder and self.train_encoder)
            and not (m is work.predictor and self.use_predictor)
        )
        model = Classifier(head, encoder if self.train_encoder else None, work if self.use_predictor else None, frozen)
        return model, groups, work

    def run(self, method: Method, ctx: TaskContext) -> dict:
        return self.tune(method, ctx)[0]

    def tune(self, method: Method, ctx: TaskContext, column: str | None = None) -> tuple[dict, Classifier]:
        """Train and evaluate on a label column (default: the data's); returns the metrics and the
        trained classifier (tests inspect it)."""
        cfg, seed = self.cfg, derive_seed(ctx.seed, sum(map(ord, self.name)))
        y_train, num_classes = ctx.labels("train", column)
        y_val, _ = ctx.labels("val", column)
        model, groups, _ = self.build(method, ctx, num_classes, seed)
        bs = cfg["batch_size"]
        # Seeded by the run only: every task of a run (and multitask's comparison) uses one subset.
        pool = train_pool(len(y_train), cfg.get("train_samples"), derive_seed(ctx.seed, TRAIN_POOL_SEED))
        if self.train_encoder:
            train_batches, steps, val_batches = image_inputs(ctx, cfg, seed, column, pool)
        else:

            def train_batches(epoch: int):
                return frozen_inputs(method, ctx, "train", y_train, bs, derive_seed(seed, epoch), pool)

            def val_batches():
                return frozen_inputs(method, ctx, "val", y_val, bs, None)

            steps = len(pool) // bs
        if steps == 0:
            raise ValueError(f"tasks.{self.name}.batch_size={bs} is larger than the training set ({len(pool)})")
        started = time.perf_counter()
        stats = train_classifier(
            model, groups, train_batches, steps, num_classes, cfg, seed, ctx.device, self.name, ctx.show_progress
        )
        train_seconds = time.perf_counter() - started
        correct = evaluate(model, val_batches(), ctx.device, bool(cfg["bf16"]))
        metrics = {
            "top1": 100.0 * float(correct.mean()),
            "evidence": Evidence("correct", {"correct": correct}, ctx.val_fingerprint(column)),
            "chance_top1": 100.0 / num_classes,
            "num_classes": num_classes,
            "trainable_params": count_parameters(groups),
            "train_seconds": train_seconds,
            "epochs": cfg["epochs"],
            "lr": cfg["lr"],
            **stats,
            "train_samples": steps * bs,
            "val_samples": len(correct),
            "encoder": "trained" if self.train_encoder else "frozen",
            "inputs": "images"
            if self.train_encoder
            else "cached tokens"
            if ctx.frozen_tokens(method, "train") is not None
            else "tokens encoded per batch",
        }
        if self.use_predictor:
            metrics["predictor"] = "random" if self.random_predictor else "pretrained"
            metrics["predictor_lr"] = cfg["lr"] * cfg["predictor_lr_scale"]
        return metrics, model


class EncoderFinetune(Finetune):
    """Encoder finetuning: encoder + head trained (MAE recipe: layer decay, drop-path, mixup)."""

    name = "encoder_ft"
    train_encoder = True
    settings = ENCODER_RECIPE


class PredictorFinetune(Finetune):
    """Predictor finetuning: frozen encoder, pretrained predictor + attentive head trained."""

    name = "predictor_ft"
    use_predictor = True
    settings = PREDICTOR_RECIPE


class RandomPredictorFinetune(Finetune):
    """Predictor finetuning control: frozen encoder, freshly initialised predictor + head."""

    name = "predictor_ft_random"
    use_predictor = True
    random_predictor = True
    settings = PREDICTOR_RECIPE


class EndToEnd(Finetune):
    """End-to-end finetuning: encoder + pretrained predictor + attentive head trained."""

    name = "end_to_end"
    train_encoder = True
    use_predictor = True
    settings = {**ENCODER_RECIPE, **PREDICTOR_RECIPE}
