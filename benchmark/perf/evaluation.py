"""Timings of the evaluation path: the feature cache, the linear-probe head grid, the task stages."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmark.perf.common import _method_and_data


def time_linear_probe(overrides: list[str], threads: int | None) -> dict:
    """Shared feature cache (first vs second request) and the head grid in one pass vs one at a time."""
    from benchmark.config import load_config
    from benchmark.core.data import resolve_data
    from tasks.base import TaskContext
    from tasks.linear import accuracy, train_heads

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(overrides)
    method, _ = _method_and_data(cfg, torch.device("cpu"))
    ctx = TaskContext(
        resolve_data(cfg.data, cfg.cache_dir),
        torch.device("cpu"),
        "target_encoder",
        cfg.seed,
        Path("."),
        show_progress=False,
    )
    start = time.perf_counter()
    x, y = ctx.pooled_features(method, "train")
    first = time.perf_counter() - start
    start = time.perf_counter()
    ctx.pooled_features(method, "train")
    second = time.perf_counter() - start

    lin = cfg.tasks.linear
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    classes = int(y.max()) + 1
    args = (lin.epochs, lin.batch_size, cfg.seed)
    start = time.perf_counter()
    grid = train_heads(x, y, classes, list(lin.lrs), list(lin.weight_decays), *args)
    grid_seconds = time.perf_counter() - start
    start = time.perf_counter()
    alone = [train_heads(x, y, classes, [lr], [wd], *args)[0] for lr, wd, _, _ in grid]
    alone_seconds = time.perf_counter() - start
    start = time.perf_counter()
    plain = [(lr, wd, sgd_head(x, y, classes, lr, wd, *args)) for lr, wd, _, _ in grid]
    plain_seconds = time.perf_counter() - start

    def compare(ours, others):
        """Per head: max |weight/bias difference| and whether train top-1 agrees."""
        diffs, same = [], []
        with torch.no_grad():
            for (_, _, a, *_), (_, _, b, *_) in zip(ours, others):
                diffs.append(max((a.weight - b.weight).abs().max().item(), (a.bias - b.bias).abs().max().item()))
                same.append(accuracy(a(x), y) == accuracy(b(x), y))
        return {"max_weight_diff": diffs, "same_train_top1": same}

    # The two baselines against each other show how far float rounding alone carries two correct
    # implementations apart (large-lr heads on separable features amplify it).
    return {
        "samples": len(x),
        "feature_dim": int(x.size(1)),
        "heads": len(grid),
        "epochs": int(lin.epochs),
        "lrs": [lr for lr, *_ in grid],
        "weight_decays": [wd for _, wd, *_ in grid],
        "features_first_seconds": first,
        "features_cached_seconds": second,
        "grid_seconds": grid_seconds,
        "one_at_a_time_seconds": alone_seconds,
        "speedup": alone_seconds / grid_seconds,
        "torch_sgd_seconds": plain_seconds,
        "speedup_vs_torch_sgd": plain_seconds / grid_seconds,
        "grid_vs_one_at_a_time": compare(grid, alone),
        "grid_vs_torch_sgd": compare(grid, plain),
        "one_at_a_time_vs_torch_sgd": compare(alone, plain),
    }


# The task stages timed by time_task_stages: a frozen-token stage and an image stage.
STAGES = ("predictor_ft", "encoder_ft")


def _stage_steps(model, groups: list[dict], x: torch.Tensor, targets: torch.Tensor, n: int, bf16: bool) -> float:
    """Seconds per step of n steps of the task stages' loop on one repeated batch."""
    from tasks.core import train
    from tasks.mixing import soft_cross_entropy

    start = time.perf_counter()
    train(
        groups,
        iter(lambda: x, None),
        n,
        lambda step: 1e-5,
        lambda inputs: soft_cross_entropy(model(inputs), targets),
        betas=(0.9, 0.999),
        clip_grad=0.0,
        device=torch.device("cpu"),
        precision="bf16" if bf16 else "fp32",
        label="timing",
    )
    return (time.perf_counter() - start) / n


def time_task_stages(
    overrides: list[str], threads: int | None, steps: int = 8, warmup: int = 2, rounds: int = 3
) -> dict:
    """Seconds per training step of the finetuning stages (predictor_ft on frozen tokens,
    encoder_ft on images), built by the real adapters and run by the real loop
    (tasks.core.train), with each attention kernel the task stages can use: fused SDPA against
    `auto` (the default: math under bf16 on CPU). Rounds interleave the kernels."""
    from benchmark.config import load_config
    from benchmark.core.data import resolve_data
    from benchmark.core.layers import use_attention
    from tasks import build_task
    from tasks.base import TaskContext

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config([*overrides, "task=all"])
    method, _ = _method_and_data(cfg, torch.device("cpu"))
    method.eval()
    ctx = TaskContext(resolve_data(cfg.data, cfg.cache_dir), torch.device("cpu"), "target_encoder", cfg.seed, Path("."))
    gen = torch.Generator().manual_seed(0)
    out = {}
    for stage in STAGES:
        if stage not in cfg.tasks:
            continue
        task = build_task(stage, cfg.tasks[stage])
        if not task.applies_to(method):
            continue
        bs, bf16 = int(task.cfg["batch_size"]), task.cfg["precision"] == "bf16"
        size = cfg.data.image_size
        x = (
            torch.randn(bs, 3, size, size, generator=gen)
            if task.train_encoder
            else torch.randn(bs, method.grid**2, method.token_dim, generator=gen)
        )
        targets = torch.nn.functional.one_hot(torch.arange(bs) % 6, 6).float()
        seconds = {"fused": [], "auto": []}
        for _ in range(rounds):
            for kind in seconds:
                restore = use_attention(method, kind, torch.device("cpu"), bf16)
                model, groups, _ = task.build(method, ctx, 6, cfg.seed)
                model.train()

                if warmup:
                    _stage_steps(model, groups, x, targets, warmup, bf16)
                seconds[kind].append(_stage_steps(model, groups, x, targets, steps, bf16))
                restore()
        fused, auto = statistics.median(seconds["fused"]), statistics.median(seconds["auto"])
        out[stage] = {
            "batch_size": bs,
            "bf16": bf16,
            "inputs": "images" if task.train_encoder else "frozen tokens",
            "fused_s_per_step": fused,
            "auto_s_per_step": auto,
            "round_medians": seconds,
            "speedup": fused / auto,
        }
    return out


def sgd_head(
    x: torch.Tensor, y: torch.Tensor, classes: int, lr: float, wd: float, epochs: int, batch_size: int, seed: int
) -> torch.nn.Linear:
    """The usual way to train one probe head: nn.Linear, autograd, torch.optim.SGD (momentum 0.9),
    the same batches and cosine schedule as tasks.linear.train_heads. The second baseline."""
    from benchmark.core.schedules import cosine

    head = torch.nn.Linear(x.size(1), classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    per_epoch = -(-len(x) // batch_size)
    gen, step = torch.Generator().manual_seed(seed), 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            opt.param_groups[0]["lr"] = cosine(step, epochs * per_epoch, lr, 0.0)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
    return head
