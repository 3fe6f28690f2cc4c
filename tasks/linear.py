"""Linear probe: frozen encoder, average-pooled tokens, a grid of linear heads trained at once.

Features are extracted once; every (learning rate, weight decay) head trains on the same cached
features in the same pass. The head used for the reported top-1 is the one with the best
accuracy on a held-out part of the train split, never chosen on the val split.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.progress import progress_bar
from benchmark.schedules import cosine
from tasks.base import Task, TaskContext


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices) of a seeded permutation; at least one sample each."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = min(n - 1, max(1, int(round(n * fraction))))
    return order[n_hold:], order[:n_hold]


def train_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: list[float], wds: list[float],
                epochs: int, batch_size: int, seed: int, show_progress: bool = False) -> list[tuple[float, float, nn.Linear]]:
    """One linear head per (lr, wd), trained together with SGD + momentum and a cosine schedule.

    All heads live in one [H, D, C] weight, so a step is one batched matmul, one cross-entropy
    and one update for the whole grid: per-step overhead, not arithmetic, is what a small head
    costs. Each head follows exactly the trajectory it would follow alone (same batches, same
    SGD with momentum 0.9, weight decay on weight and bias, as torch.optim.SGD computes it).
    """
    grid = [(lr, wd) for lr in lrs for wd in wds]
    weight = x.new_zeros(len(grid), x.size(1), num_classes, requires_grad=True)
    bias = x.new_zeros(len(grid), 1, num_classes, requires_grad=True)
    base_lr = x.new_tensor([lr for lr, _ in grid]).view(-1, 1, 1)
    decay = x.new_tensor([wd for _, wd in grid]).view(-1, 1, 1)
    momentum = [torch.zeros_like(weight), torch.zeros_like(bias)]
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    step = 0
    with progress_bar("linear heads", epochs, enabled=show_progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                logits = torch.matmul(x[idx], weight) + bias  # [H, n, C]
                # Sum over heads of each head's mean loss: the heads' gradients stay independent.
                loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(len(grid)), reduction="sum") / len(idx)
                grads = torch.autograd.grad(loss, [weight, bias])
                lr = cosine(step, total, 1.0, 0.0) * base_lr
                with torch.no_grad():
                    for p, g, buf in zip((weight, bias), grads, momentum):
                        buf.mul_(0.9).add_(g + decay * p)
                        p.sub_(lr * buf)
                step += 1
            bar.advance()
    heads = []
    for h, (lr, wd) in enumerate(grid):
        head = nn.Linear(x.size(1), num_classes)
        with torch.no_grad():
            head.weight.copy_(weight[h].T)
            head.bias.copy_(bias[h, 0])
        heads.append((lr, wd, head))
    return heads


class LinearProbe(Task):
    """Linear probe on frozen average-pooled tokens, a grid of heads picked on held-out data."""
    name = "linear"

    def run(self, method, ctx: TaskContext) -> dict:
        cfg = self.cfg
        x_train, y_train = ctx.pooled_features(method, "train")
        x_val, y_val = ctx.pooled_features(method, "val")
        num_classes = int(max(y_train.max(), y_val.max())) + 1
        fit, held = holdout_split(len(x_train), cfg["heldout_fraction"], ctx.seed)
        if cfg["standardize"]:
            mean, std = x_train[fit].mean(0), x_train[fit].std(0) + 1e-6
            x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
        heads = train_heads(x_train[fit], y_train[fit], num_classes, list(cfg["lrs"]), list(cfg["weight_decays"]),
                            cfg["epochs"], cfg["batch_size"], ctx.seed, ctx.show_progress)
        grid = []
        with torch.no_grad():
            for lr, wd, head in heads:
                grid.append({"lr": lr, "weight_decay": wd, "heldout_top1": 100 * accuracy(head(x_train[held]), y_train[held]),
                             "val_top1": 100 * accuracy(head(x_val), y_val)})
        best = max(grid, key=lambda row: row["heldout_top1"])
        return {"top1": best["val_top1"], "heldout_top1": best["heldout_top1"], "best_lr": best["lr"],
                "best_weight_decay": best["weight_decay"], "chance_top1": 100.0 / num_classes,
                "num_classes": num_classes, "feature_dim": int(x_train.size(1)),
                "train_samples": len(fit), "heldout_samples": len(held), "val_samples": len(x_val), "grid": grid}
