"""Linear probe on a frozen encoder, by one of two protocols (`tasks.linear.protocol`).

- `grid` (the CPU preset): average-pooled tokens extracted once; every (learning rate, weight
  decay) head trains on the same cached features in the same pass, and the head reported is the
  one with the best accuracy on a held-out part of the train split (never chosen on val).
- `streaming` (the paper preset: MAE's `main_linprobe.py`): the frozen encoder runs inside the
  loop on augmented crops (one-draw random resized crop + flip), no gradient and under autocast;
  its pooled feature (`pool`: cls token for MAE, patch-token mean for the JEPAs) goes through
  BatchNorm1d(affine=False, eps=1e-6) and one linear layer (weights trunc-normal std 0.01),
  trained with LARS (momentum 0.9, trust 0.001, lr = blr x batch / 256) under a per-step linear
  warmup + half-cosine schedule, cross-entropy; top-1 on centre crops after the last epoch.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from benchmark.core import distributed
from benchmark.core.errors import ConfigError
from benchmark.core.layers import to_device
from benchmark.core.loading import eval_loader, stack_views, train_loader
from benchmark.core.optim import LARS
from benchmark.core.progress import progress_bar
from benchmark.core.schedules import cosine, warmup_cosine
from benchmark.core.seeding import derive_seed, seeded
from benchmark.core.stats import Evidence
from benchmark.core.transforms import probe_transform
from methods.base import Method
from tasks.base import POOLS, Choice, Flag, Number, Numbers, Task, TaskContext
from tasks.core import HEAD_SEED, PRECISIONS, autocast, loss_summary, train


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices) of a seeded permutation; at least one sample each."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = min(n - 1, max(1, int(round(n * fraction))))
    return order[n_hold:], order[:n_hold]


def train_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lrs: list[float],
    wds: list[float],
    epochs: int,
    batch_size: int,
    seed: int,
    show_progress: bool = False,
) -> list[tuple[float, float, nn.Linear, list[float]]]:
    """One linear head per (lr, wd), trained together with SGD + momentum and a cosine schedule;
    per head (lr, wd, the head, its mean training loss of every epoch).

    The heads sit side by side in one [D, heads * classes] weight, so a step is ONE matrix
    product for every head's logits and one for every head's weight gradient (a single wide
    product runs far closer to the machine's speed than a batch of [D, classes] ones, and the
    batch is gathered once for all heads); the gradient is written out (softmax minus one-hot)
    rather than taken through autograd, whose per-step overhead outweighs a small head's
    arithmetic. Each head follows the trajectory it follows alone (same batches, SGD with
    momentum 0.9 and weight decay on weight and bias, as torch.optim.SGD computes it), equal up
    to float rounding (tests/test_perf.py).
    """
    grid = [(lr, wd) for lr in lrs for wd in wds]
    heads, dim, n_total = len(grid), x.size(1), len(x)
    width = heads * num_classes
    # The bias is one more weight row fed by a constant-1 feature, so weight and bias take one
    # product and one update (torch.optim.SGD decays the bias too, and so does this).
    x = torch.cat([x, x.new_ones(n_total, 1)], dim=1)
    weight = x.new_zeros(dim + 1, width)
    # Columns are class-major (column c * heads + h is class c of head h): the softmax then runs
    # over a middle axis with the heads contiguous, several times faster on CPU than a softmax
    # over a last axis of a few classes. Per column: its head's learning rate and weight decay.
    base_lr = x.new_tensor([lr for lr, _ in grid]).repeat(num_classes)
    decay = x.new_tensor([wd for _, wd in grid]).repeat(num_classes)
    velocity = torch.zeros_like(weight)
    steps_per_epoch = math.ceil(n_total / batch_size)
    total = epochs * steps_per_epoch
    rows = torch.arange(batch_size)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    curves = []
    with progress_bar("linear heads", epochs, enabled=show_progress) as bar:
        for _ in range(epochs):
            epoch_loss = x.new_zeros(heads)
            order = torch.randperm(n_total, generator=gen)
            xs, ys = x[order], y[order]  # one gather per epoch; batches are then contiguous views
            for i in range(steps_per_epoch):
                xb, yb = xs[i * batch_size : (i + 1) * batch_size], ys[i * batch_size : (i + 1) * batch_size]
                n = len(xb)
                # d(mean cross-entropy)/d(logits) = (softmax - one-hot) / n, for every head at once.
                logits = (xb @ weight).view(n, num_classes, heads)
                g = (logits - logits.amax(dim=1, keepdim=True)).exp_()
                g.div_(g.sum(dim=1, keepdim=True))
                epoch_loss -= g[rows[:n], yb, :].clamp_min(1e-30).log().sum(0)  # cross-entropy, per head
                g[rows[:n], yb, :] -= 1.0
                grad = xb.T @ g.view(n, width)
                velocity.mul_(0.9).add_(grad, alpha=1.0 / n).addcmul_(decay, weight)
                weight.addcmul_(cosine(step, total, 1.0, 0.0) * base_lr, velocity, value=-1.0)
                step += 1
            curves.append((epoch_loss / n_total).tolist())
            bar.advance()
    out = []
    for h, (lr, wd) in enumerate(grid):
        head = nn.Linear(dim, num_classes)
        cols = slice(h, width, heads)
        with torch.no_grad():
            head.weight.copy_(weight[:dim, cols].T)
            head.bias.copy_(weight[dim, cols])
        out.append((lr, wd, head, [epoch[h] for epoch in curves]))
    return out


class BatchNormLinear(nn.Module):
    """MAE's linear-probe head: BatchNorm1d without affine parameters (eps 1e-6), then linear
    (weights trunc-normal with `init_std`, bias 0)."""

    def __init__(self, dim: int, num_classes: int, init_std: float = 0.01):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        trunc_normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


PROTOCOLS = ("grid", "streaming")


class LinearProbe(Task):
    """Linear probe on a frozen encoder: a cached grid of heads, or MAE's streaming LARS probe."""

    name = "linear"
    settings = {
        "protocol": Choice(PROTOCOLS),
        # mean of the patch tokens, the cls token, or `method`: what the method's own paper probes.
        "pool": Choice(POOLS),
        "epochs": Number(1, integer=True),
        "batch_size": Number(1, integer=True),
        # grid
        "lrs": Numbers(Number(0, low_open=True)),
        "weight_decays": Numbers(Number(0)),
        # Both parts of the train split keep samples: (0, 1) open.
        "heldout_fraction": Number(0, 1, low_open=True, high_open=True),
        "standardize": Flag(),
        # streaming
        "blr": Number(0, low_open=True),
        "min_lr": Number(0),
        "warmup_epochs": Number(0),
        "weight_decay": Number(0),
        "momentum": Number(0, 1, high_open=True),
        "trust_coefficient": Number(0, low_open=True),
        "crop_scale": Numbers(Number(0, 1, low_open=True)),
        "head_init_std": Number(0, low_open=True),
        "precision": Choice(PRECISIONS),
    }

    @property
    def data_parallel(self) -> bool:
        return self.cfg["protocol"] == "streaming"

    def pool(self, method: Method) -> str:
        return method.probe_pool if self.cfg["pool"] == "method" else self.cfg["pool"]

    def check(self, method: Method) -> None:
        pool = self.pool(method)
        if pool not in method.probe_pools:
            raise ConfigError(
                f"tasks.linear.pool={self.cfg['pool']}: method {method.name} has no {pool} feature "
                f"(it offers {', '.join(method.probe_pools)})"
            )
        if self.cfg["protocol"] != "streaming":
            return
        scale = self.cfg["crop_scale"]
        if len(scale) != 2 or scale[0] > scale[1]:
            raise ConfigError(f"tasks.linear.crop_scale must be [low, high] with low <= high, got {scale}")
        ranks = distributed.planned_size()
        if self.cfg["batch_size"] % ranks:
            raise ConfigError(f"tasks.linear.batch_size={self.cfg['batch_size']} does not split over {ranks} processes")
        if self.cfg["warmup_epochs"] > self.cfg["epochs"]:
            raise ConfigError(
                f"tasks.linear.warmup_epochs={self.cfg['warmup_epochs']} is longer than epochs={self.cfg['epochs']}"
            )

    def run(self, method, ctx: TaskContext) -> dict:
        if self.cfg["protocol"] == "streaming":
            return self.run_streaming(method, ctx)
        return self.run_grid(method, ctx)

    def run_grid(self, method, ctx: TaskContext) -> dict:
        cfg = self.cfg
        pool = self.pool(method)
        x_train, y_train = ctx.pooled_features(method, "train", pool)
        x_val, y_val = ctx.pooled_features(method, "val", pool)
        num_classes = int(max(y_train.max(), y_val.max())) + 1
        fit, held = holdout_split(len(x_train), cfg["heldout_fraction"], ctx.seed)
        if cfg["standardize"]:
            mean, std = x_train[fit].mean(0), x_train[fit].std(0) + 1e-6
            x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
        heads = train_heads(
            x_train[fit],
            y_train[fit],
            num_classes,
            list(cfg["lrs"]),
            list(cfg["weight_decays"]),
            cfg["epochs"],
            cfg["batch_size"],
            ctx.seed,
            ctx.show_progress,
        )
        grid = []
        with torch.no_grad():
            for lr, wd, head, _ in heads:
                grid.append(
                    {
                        "lr": lr,
                        "weight_decay": wd,
                        "heldout_top1": 100 * accuracy(head(x_train[held]), y_train[held]),
                        "val_top1": 100 * accuracy(head(x_val), y_val),
                    }
                )
        best_index = max(range(len(grid)), key=lambda i: grid[i]["heldout_top1"])
        best = grid[best_index]
        curve = heads[best_index][3]
        with torch.no_grad():
            correct = (heads[best_index][2](x_val).argmax(dim=-1) == y_val).numpy()
        return {
            "protocol": "grid",
            "pool": pool,
            "evidence": Evidence("correct", {"correct": correct}, ctx.val_fingerprint()),
            "top1": best["val_top1"],
            "heldout_top1": best["heldout_top1"],
            "best_lr": best["lr"],
            "best_weight_decay": best["weight_decay"],
            "chance_top1": 100.0 / num_classes,
            "num_classes": num_classes,
            "feature_dim": int(x_train.size(1)),
            "train_samples": len(fit),
            "heldout_samples": len(held),
            "val_samples": len(x_val),
            "grid": grid,
            # The chosen head's training loss, one point per epoch (tasks/core.py's rule).
            **loss_summary(curve, 1),
        }

    def run_streaming(self, method: Method, ctx: TaskContext) -> dict:
        cfg, device = self.cfg, ctx.device
        seed = derive_seed(ctx.seed, sum(map(ord, self.name)))
        pool, key = self.pool(method), ctx.encoder_key
        train_set, val_set = ctx.source.split("train"), ctx.source.split("val")
        num_classes = len(train_set.classes)
        bs = cfg["batch_size"]
        steps_per_epoch = len(train_set) // bs
        if steps_per_epoch == 0:
            raise ValueError(f"tasks.linear.batch_size={bs} is larger than the training set ({len(train_set)})")
        total = cfg["epochs"] * steps_per_epoch
        warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))
        # MAE's linear scaling rule: the base lr is per 256 images of the (global) batch.
        peak = cfg["blr"] * bs / 256
        world = distributed.current()
        with seeded(derive_seed(seed, HEAD_SEED)):
            probe = BatchNormLinear(method.token_dim, num_classes, cfg["head_init_std"]).to(device)
        # On several ranks each takes its share of every batch and normalises it with its own
        # batch statistics (plain BatchNorm under DDP, as the official probe), gradients averaged.
        head = distributed.replicated(probe, device)
        encoder = method.eval_encoder(key).to(device)
        was_training = encoder.training
        encoder.eval()
        transform = probe_transform(ctx.source.image_size, cfg["crop_scale"])

        def batches():
            for epoch in range(cfg["epochs"]):
                loader = train_loader(
                    train_set,
                    transform,
                    stack_views,
                    bs,
                    seed,
                    epoch,
                    workers=ctx.workers,
                    rank=world.rank,
                    world_size=world.size,
                )
                for batch in loader:
                    yield to_device(batch, device)

        def loss(batch):
            with torch.no_grad():
                features = method.probe_features(batch["images"], key, pool)
            return F.cross_entropy(head(features.float()), batch["labels"])

        def lars(groups):
            return LARS(
                groups,
                weight_decay=cfg["weight_decay"],
                momentum=cfg["momentum"],
                trust_coefficient=cfg["trust_coefficient"],
            )

        started = time.perf_counter()
        head.train()
        losses = train(
            [{"params": list(probe.parameters()), "lr_scale": 1.0}],
            batches(),
            total,
            lambda step: warmup_cosine(step, total, warmup, 0.0, peak, cfg["min_lr"]),
            loss,
            betas=None,
            clip_grad=0.0,
            device=device,
            precision=cfg["precision"],
            label="linear",
            show_progress=ctx.show_progress,
            optimizer=lars,
        )
        train_seconds = time.perf_counter() - started
        # Every rank took the same averaged steps (the BatchNorm statistics are each rank's own).
        distributed.check_in_sync(probe.linear, "the linear probe")
        if not world.is_main:
            encoder.train(was_training)
            return {}
        probe.eval()
        correct = []
        with torch.no_grad():
            # The run's extraction batch, not the global training one (16,384 at paper scale).
            for batch in eval_loader(val_set, ctx.source.image_size, ctx.batch_size, ctx.workers):
                batch = to_device(batch, device)
                with autocast(device, cfg["precision"]):
                    features = method.probe_features(batch["images"], key, pool)
                correct.append((probe(features.float()).argmax(-1) == batch["labels"]).cpu().numpy())
        encoder.train(was_training)
        correct = np.concatenate(correct)
        return {
            "protocol": "streaming",
            "pool": pool,
            "evidence": Evidence("correct", {"correct": correct}, ctx.val_fingerprint()),
            "top1": 100.0 * float(correct.mean()),
            "chance_top1": 100.0 / num_classes,
            "num_classes": num_classes,
            "feature_dim": method.token_dim,
            "lr": peak,
            "train_samples": steps_per_epoch * bs,
            "val_samples": len(correct),
            "train_seconds": train_seconds,
            "ranks": world.size,
            **loss_summary(losses, steps_per_epoch),
        }
