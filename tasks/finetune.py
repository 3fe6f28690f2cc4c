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

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch.utils.data import Subset

from benchmark.core.errors import ConfigError
from benchmark.core.layers import to_device
from benchmark.core.loading import eval_loader, stack_views, train_loader
from benchmark.core.optim import count_parameters, param_groups
from benchmark.core.seeding import derive_seed, seeded
from benchmark.core.stats import Evidence
from benchmark.core.transforms import crop_transform, recipe_transform
from methods.base import Method
from tasks.base import Applies, Task, TaskContext
from tasks.core import (
    HEAD_SEED,
    MIX_SEED,
    RANDOM_PREDICTOR_SEED,
    TRAIN_POOL_SEED,
    autocast,
    loss_summary,
    set_drop_path,
    train,
    train_like,
    working_copy,
)
from tasks.heads import build_head
from tasks.mixing import soft_cross_entropy
from tasks.recipe import (
    ENCODER_RECIPE,
    PREDICTOR_RECIPE,
    RECIPE,
    check_blocks,
    check_head,
    head_heads,
    lr_schedule,
    mixed,
    wd_schedule,
)

Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


# --- the model being tuned -------------------------------------------------------------------------
class Classifier(nn.Module):
    """[encoder] -> [world model on the whole clean image] -> head.

    Without an encoder the inputs are already the frozen encoder's tokens. Modules listed in
    `frozen` (the ones shared with the run's method) stay in eval mode whatever mode the
    classifier is put in; a frozen encoder that reads images runs without gradients.
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
        self.encoder_frozen = any(encoder is m for m in frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if self.encoder is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
                x = self.encoder(x)
        if self.world_model is not None:
            x = self.world_model.predict_full(x, extra=extra)
        return self.head(x)


# --- the loop ----------------------------------------------------------------------------------------
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
        wd_at=wd_schedule(cfg, total),
        betas=cfg["betas"],
        clip_grad=cfg["clip_grad"],
        device=device,
        precision=cfg["precision"],
        label=label,
        show_progress=show_progress,
    )
    model.eval()
    return loss_summary(losses, steps_per_epoch)


def evaluate(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device, precision: str
) -> np.ndarray:
    """Whether each sample, in order, is classified right (top-1)."""
    correct = []
    model.eval()
    with torch.no_grad(), autocast(device, precision):
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
    """Augmented training images of the samples in `pool` (RandomResizedCrop + flip, plus
    RandAugment and random erasing when the recipe asks for them), their steps per epoch, and val
    images, labelled by `column` (default: the data's label)."""
    source = ctx.source if column is None else replace(ctx.source, label_column=column)
    dataset = Subset(source.split("train"), pool.tolist())
    if cfg["auto_augment"] or cfg["reprob"]:
        transform = recipe_transform(
            source.image_size,
            cfg["crop_scale"],
            cfg["flip"],
            cfg["auto_augment"],
            cfg["reprob"],
            cfg["remode"],
            cfg["recount"],
        )
    else:
        transform = crop_transform(source.image_size, cfg["crop_scale"], flip=cfg["flip"])

    def train_images(epoch: int):
        loader = train_loader(dataset, transform, stack_views, cfg["batch_size"], seed, epoch, workers=ctx.workers)
        for batch in loader:
            batch = to_device(batch, ctx.device)
            yield batch["images"], batch["labels"]

    def val():
        loader = eval_loader(
            source.split("val"), source.image_size, cfg["batch_size"], ctx.workers, cfg["eval_interpolation"]
        )
        for batch in loader:
            batch = to_device(batch, ctx.device)
            yield batch["images"], batch["labels"]

    return train_images, len(dataset) // cfg["batch_size"], val


# --- the adapters --------------------------------------------------------------------------------------
class Finetune(Task):
    """Shared by the finetuning adapters; subclasses say what is trained."""

    train_encoder = False
    use_predictor = False
    random_predictor = False
    settings = RECIPE

    def applies_to(self, method: Method) -> Applies:
        return Applies.needs(method, predictor=self.use_predictor)

    def check(self, method: Method) -> None:
        cfg = self.cfg
        if self.use_predictor:
            check_head(self.name, cfg, method.world_model_dim, method.world_model_heads)
        else:
            check_head(self.name, cfg, method.token_dim, method.token_heads)
        if self.train_encoder:
            check_blocks(self.name, cfg, method.encoder, f"method {method.name}'s encoder")
        elif self.use_predictor:
            check_blocks(self.name, cfg, method.predictor, f"method {method.name}'s predictor", layer_decay=False)
        if (cfg["mixup"] or cfg["cutmix"]) and cfg["batch_size"] % 2:
            raise ConfigError(
                f"tasks.{self.name}.batch_size={cfg['batch_size']}: mixup/cutmix pair each sample with "
                f"the batch's mirror image and need an even batch"
            )
        if self.train_encoder and cfg["inputs"] != "images":
            raise ConfigError(f"tasks.{self.name}.inputs=tokens: a trained encoder reads images (inputs: images)")
        scale = cfg["crop_scale"]
        if len(scale) != 2 or scale[0] > scale[1]:
            raise ConfigError(f"tasks.{self.name}.crop_scale must be [low, high] with low <= high, got {scale}")
        if not self.train_encoder:
            return
        encoder = method.encoder
        if cfg["train_pos_embed"] and not isinstance(getattr(encoder, "pos_embed", None), nn.Parameter):
            raise ConfigError(
                f"tasks.{self.name}.train_pos_embed=true: method {method.name}'s encoder has no pos_embed"
            )
        if not cfg["final_norm"] and (self.use_predictor or not isinstance(getattr(encoder, "norm", None), nn.Module)):
            raise ConfigError(
                f"tasks.{self.name}.final_norm=false applies to an encoder with a final `norm` that "
                f"feeds the head directly (encoder_ft)"
            )

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
            if self.use_predictor:
                width, heads = work.world_model_dim, head_heads(cfg, work.world_model_heads)
            else:
                width, heads = work.token_dim, head_heads(cfg, work.token_heads)
            head = build_head(cfg["head"], width, num_classes, heads)
        # The official attentive probe decays its query tokens like any matrix (tokens=False).
        groups = param_groups(head, cfg["weight_decay"], tokens=False)
        if self.use_predictor:
            set_drop_path(work.predictor, cfg["drop_path"])
            groups += param_groups(work.predictor, cfg["weight_decay"], cfg["predictor_lr_scale"])
        if cfg.get("head_init_std") is not None:
            with seeded(derive_seed(seed, HEAD_SEED)):
                trunc_normal_(head.linear.weight, std=cfg["head_init_std"])
            nn.init.zeros_(head.linear.bias)
        if self.train_encoder:
            train_like(encoder, method.encoder)
            if cfg["train_pos_embed"]:
                encoder.pos_embed.requires_grad_(True)
            if not cfg["final_norm"]:
                encoder.norm = nn.Identity()
            set_drop_path(encoder, cfg["drop_path"])
            groups += param_groups(encoder, cfg["weight_decay"], layer_decay=cfg["layer_decay"])
        frozen = tuple(
            m
            for m in (work.encoder, work.target_encoder, work.predictor)
            if m is not None
            and not (m is encoder and self.train_encoder)
            and not (m is work.predictor and self.use_predictor)
        )
        reads_images = self.train_encoder or cfg["inputs"] == "images"
        model = Classifier(head, encoder if reads_images else None, work if self.use_predictor else None, frozen)
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
        if cfg["inputs"] == "images":
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
        correct = evaluate(model, val_batches(), ctx.device, cfg["precision"])
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
            if cfg["inputs"] == "images"
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
