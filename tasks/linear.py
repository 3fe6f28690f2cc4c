"""Linear probe: frozen encoder, average-pooled tokens, a grid of linear heads trained at once.

Features are extracted once; every (learning rate, weight decay) head trains on the same cached
features in the same pass. The head used for the reported top-1 is the one with the best
accuracy on a held-out part of the train split, never chosen on the val split.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from benchmark.core.progress import progress_bar
from benchmark.core.schedules import cosine
from benchmark.core.stats import Evidence
from tasks.base import Flag, Number, Numbers, Task, TaskContext
from tasks.core import loss_summary


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


class LinearProbe(Task):
    """Linear probe on frozen average-pooled tokens, a grid of heads picked on held-out data."""

    name = "linear"
    settings = {
        "lrs": Numbers(Number(0, low_open=True)),
        "weight_decays": Numbers(Number(0)),
        "epochs": Number(1, integer=True),
        "batch_size": Number(1, integer=True),
        # Both parts of the train split keep samples: (0, 1) open.
        "heldout_fraction": Number(0, 1, low_open=True, high_open=True),
        "standardize": Flag(),
    }

    def run(self, method, ctx: TaskContext) -> dict:
        cfg = self.cfg
        x_train, y_train = ctx.pooled_features(method, "train")
        x_val, y_val = ctx.pooled_features(method, "val")
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
