"""`bench perf`: how fast pretraining and evaluation run, and proof that the fast path computes
the same thing.

Training step. Each (method, precision, variant) case is built through the real config tree and
run in a fresh subprocess (so its peak memory is its own): the real data path feeds the real
method through the step the pretraining loop runs (benchmark/step.py). Two timings per case:
the step alone on batches already built (the FLOP rate is of this one), and the training loop as
pretraining runs it, fed by the default loader workers, with the time each step waited for its
batch (on a machine with no spare core the workers take CPU from the step, so the loop can be
slower than the step alone).
Per case: median seconds after warm-up, images/s, the cost of building one batch in one
process, peak memory (max RSS on CPU, max allocated on GPU), the FLOPs of each timed step
(FlopCounterMode) and their rate as a fraction of the machine's matmul ceiling measured in the
same run, and the loss of every step. Two variants per method and precision: `eager` (plain
AdamW loop, timm's SDPA attention, no compile) and `fast` (the defaults, compiled with
--compile); their losses must agree within a tolerance, and the table says whether they do.

Evaluation. Pooled features are extracted once per (checkpoint, dataset) and cached for every
frozen probe (first versus second request is timed), and the linear-probe grid trained in one
pass is timed against the same heads trained one at a time, with the largest weight difference
between the two. The finetuning stages' training step (frozen tokens and images) is timed with
each attention kernel the task stages can run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

# The reference configurations: ViT-tiny/16 at 224 px, batch 8.
_TINY_224 = ["model=vit_tiny", "data.image_size=224", "pretrain.batch_size=8"]
CPU_CASES = {
    "ijepa": [
        "method=ijepa",
        *_TINY_224,
        "method.predictor.depth=6",
        "method.predictor.width=384",
        "method.mask.min_keep=10",
    ],
    "iwm": [
        "method=iwm",
        *_TINY_224,
        "method.predictor.depth=6",
        "method.predictor.width=384",
        "method.mask.min_keep=10",
    ],
    "mae": [
        "method=mae",
        *_TINY_224,
        "method.predictor.depth=4",
        "method.predictor.width=128",
        "method.mask_ratio=0.75",
    ],
}
# Paper-sized ViT-B/16 cases for a GPU (the IWM, I-JEPA-like and MAE presets at 224 px).
_BASE_224 = ["model=vit_base", "data.image_size=224", "pretrain.batch_size=128"]
GPU_CASES = {
    "ijepa": [
        "method=ijepa",
        *_BASE_224,
        "method.predictor.depth=12",
        "method.predictor.width=384",
        "method.mask.min_keep=10",
    ],
    "iwm": ["method=iwm_equi_18_384", *_BASE_224],
    "mae": ["method=mae_paper", *_BASE_224],
}
VARIANTS = {"eager": ["pretrain.fused_adamw=false", "pretrain.compile=false", "pretrain.attention=fused"], "fast": []}
PRECISIONS = ("fp32", "bf16")


class PerfError(ValueError):
    """A benchmark request that cannot run (unknown method, bad option)."""


# --- measurements inside one process ----------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best GFLOP/s of a large square matmul: what the machine can do at best."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _method_and_data(cfg, device: torch.device):
    from benchmark.core.data import resolve_data
    from methods import build_method

    dataset = resolve_data(cfg.data, cfg.cache_dir).split("train")
    torch.manual_seed(cfg.seed)
    method = build_method(
        cfg.method.name, OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.method), cfg.data.image_size
    )
    return method.to(device).train(), dataset


def training_step(cfg, method, dataset_size: int, device: torch.device):
    """The step the pretraining loop runs, as `train(step_index, batch) -> loss`, and its optimizer:
    the run's optimizer, attention kernel, lr / weight-decay schedule and EMA, nothing else."""
    from benchmark.core.layers import use_attention
    from benchmark.pretrain import Schedule, set_hyperparameters
    from benchmark.step import forward_loss, make_optimizer, step_function, update

    pcfg = cfg.pretrain
    opt = make_optimizer(method, pcfg)
    step_fn = step_function(method, bool(pcfg.compile))
    use_attention(method, pcfg.attention, device, bool(pcfg.bf16))
    schedule = Schedule.of(pcfg, dataset_size)

    def train(i: int, batch: dict) -> float:
        set_hyperparameters(opt, pcfg, schedule, i)
        loss = forward_loss(step_fn, batch, device, bool(pcfg.bf16))
        update(method, opt, loss, pcfg.clip_grad, i / schedule.total_steps)
        value = loss.item()
        _sync(device)
        return value

    return train, opt


def time_training_step(overrides: list[str], steps: int, warmup: int, device: str, threads: int | None) -> dict:
    """Warm-up then timed steps of the real training step on the real data path (one case)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmark.config import load_config
    from benchmark.core.layers import to_device
    from benchmark.core.loading import train_loader
    from benchmark.step import forward_loss

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cfg = load_config(overrides)
    pcfg = cfg.pretrain
    method, dataset = _method_and_data(cfg, dev)
    train, opt = training_step(cfg, method, len(dataset), dev)
    total = warmup + steps

    def loader(workers: int, epoch: int):
        return train_loader(
            dataset,
            method.train_transform(),
            method.collate,
            pcfg.batch_size,
            cfg.seed,
            epoch,
            workers=workers,
            pin_memory=dev.type == "cuda",
        )

    # Batches for the step alone (a second epoch: other views and masks than the loop's), built
    # first in this process; what one costs is the data-path figure.
    start = time.perf_counter()
    prebuilt = [to_device(b, dev) for _, b in zip(range(steps), loader(0, 1))]
    data_seconds = (time.perf_counter() - start) / len(prebuilt)

    # The training loop as pretraining runs it: warm-up, then timed steps, fed by the default
    # loader workers (which share the CPU with the step); how long each step waited for its batch.
    loop_seconds, waits, losses = [], [], []
    feed = iter(loader(cfg.workers, 0))
    for i in range(total):
        start = time.perf_counter()
        batch = to_device(next(feed), dev)
        _sync(dev)
        ready = time.perf_counter()
        value = train(i, batch)
        if i >= warmup:
            loop_seconds.append(time.perf_counter() - ready)
            waits.append(ready - start)
            losses.append(value)
    del feed
    # The step alone, as the official code's figures time it: batches already in memory, nothing
    # else running. A first untimed pass over them builds the kernels of their mask shapes (a
    # bf16 product builds one the first time it meets a shape), so that a timing does not depend
    # on which shapes the warm-up happened to meet; the second pass is timed.
    seconds = []
    for j, batch in enumerate(prebuilt + prebuilt):
        start = time.perf_counter()
        losses.append(train(total + j, batch))
        if j >= len(prebuilt):
            seconds.append(time.perf_counter() - start)
    memory = peak_memory_mib(dev)

    # FLOPs of exactly the timed batches (forward, loss, backward), counted eagerly.
    flops = []
    for batch in prebuilt:
        with FlopCounterMode(display=False) as counter:
            forward_loss(method.training_step, batch, dev, bool(pcfg.bf16)).backward()
        opt.zero_grad(set_to_none=True)
        flops.append(counter.get_total_flops())
    return {
        "seconds": seconds,
        "loop_seconds": loop_seconds,
        "waits": waits,
        "losses": losses,
        "flops": flops,
        "data_seconds_per_batch": data_seconds,
        "peak_memory_mib": memory,
        "batch_size": int(pcfg.batch_size),
        "workers": int(cfg.workers),
        "threads": torch.get_num_threads(),
    }


def measure_ceiling(device: str, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    size = 8192 if dev.type == "cuda" else 2048
    return {p: matmul_ceiling(dev, torch.float32 if p == "fp32" else torch.bfloat16, size) for p in PRECISIONS}


def _child(kind: str, kwargs: dict) -> dict:
    """Run one measurement in a fresh interpreter; its result is the last line it prints."""
    module = "perf_official" if kind == "time_against_official" else "perf"
    code = (
        f"import json, sys; from benchmark import {module} as m; print(json.dumps(m.{kind}(**json.loads(sys.argv[1]))))"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{kind} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- evaluation path -----------------------------------------------------------------------------


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


# --- the whole benchmark ---------------------------------------------------------------------------


def case_overrides(method: str, precision: str, variant: str, gpu: bool, compile: bool, extra: list[str]) -> list[str]:
    """The config overrides of one case: the reference case (any other method preset: the preset
    at the reference size), then the user's, then the variant's."""
    base = (GPU_CASES if gpu else CPU_CASES).get(method) or [f"method={method}", *(_BASE_224 if gpu else _TINY_224)]
    out = [*base, *extra, f"pretrain.bf16={precision == 'bf16'}", *VARIANTS[variant]]
    if variant == "fast" and compile:
        out.append("pretrain.compile=true")
    return out


def _sized_data(overrides: list[str], images: int) -> list[str]:
    """Make the built-in data just big enough for the steps (generated once, then cached)."""
    from benchmark.config import load_config

    cfg = load_config(overrides)
    if cfg.data.kind != "builtin":
        return overrides
    return [
        *overrides,
        f"data.num_train={max(images, cfg.pretrain.batch_size)}",
        f"data.num_val={cfg.pretrain.batch_size}",
    ]


def available_methods() -> list[str]:
    """Every method preset (`bench list`): the three reference cases first, then the others."""
    from benchmark.config import group_options

    presets = group_options("method")
    return [m for m in CPU_CASES if m in presets] + [m for m in presets if m not in CPU_CASES]


def summarise(case: dict, ceiling: dict, peak_tflops: float | None) -> dict:
    seconds = statistics.median(case["seconds"])
    loop = statistics.median(case["loop_seconds"])
    gflop = statistics.mean(case["flops"]) / 1e9
    rate = sum(case["flops"]) / sum(case["seconds"]) / 1e9
    row = {
        "s_per_step": seconds,
        "loop_s_per_step": loop,
        "images_per_s": case["batch_size"] / seconds,
        "gflop_per_step": gflop,
        "gflops": rate,
        "ceiling_fraction": rate / ceiling[case["precision"]],
        "wait_s_per_step": statistics.median(case["waits"]),
        "max_wait_s": max(case["waits"]),
        "data_s_per_batch": case["data_seconds_per_batch"],
        "waits_for_data": max(case["waits"]) > 0.05 * loop,
    }
    if peak_tflops:
        row["mfu"] = rate / (peak_tflops * 1e3)
    return row


def check_numerics(cases: list[dict], rtol: dict) -> None:
    """Attach to every fast case the largest relative loss difference to its eager twin."""
    eager = {(c["method"], c["precision"]): c for c in cases if c["variant"] == "eager"}
    for c in cases:
        twin = eager.get((c["method"], c["precision"]))
        if c["variant"] == "eager" or twin is None:
            continue
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(c["losses"], twin["losses"]))
        c["loss_rel_diff_vs_eager"] = diff
        c["equal_numerics"] = diff <= rtol[c["precision"]]


def run_benchmark(
    methods: list[str],
    precisions: list[str],
    overrides: list[str],
    steps: int,
    warmup: int,
    device: str,
    threads: int | None,
    gpu_cases: bool,
    compile: bool,
    rounds: int,
    probe: list[str] | None,
    rtol: dict,
    peak_tflops: float | None,
    log=print,
    official_ijepa: str | None = None,
    pairs: int = 6,
) -> dict:
    known = available_methods()
    skipped = {m: f"method={m} is not in this checkout" for m in methods if m not in known}
    methods = [m for m in methods if m in known]
    cases = []
    for method in methods:
        for precision in precisions:
            for variant in VARIANTS:
                ov = case_overrides(method, precision, variant, gpu_cases, compile, overrides)
                ov = _sized_data(ov, (steps + warmup) * _batch_size(ov))
                cases.append(
                    {
                        "method": method,
                        "precision": precision,
                        "variant": variant,
                        "overrides": ov,
                        "gpu": gpu_cases,
                        "runs": [],
                    }
                )
    # Every case must build before anything is timed; the data is generated once, here.
    from benchmark.config import load_config
    from benchmark.core.data import resolve_data
    from methods import build_method

    for case in cases:
        cfg = load_config(case["overrides"])
        try:
            build_method(
                cfg.method.name,
                OmegaConf.to_container(cfg.model),
                OmegaConf.to_container(cfg.method),
                cfg.data.image_size,
            )
        except ValueError as exc:
            raise PerfError(f"{case['method']} case does not build: {exc}") from None
        resolve_data(cfg.data, cfg.cache_dir)
    if probe is not None:
        load_config(probe)
    if official_ijepa is not None:
        from benchmark.perf_official import import_official_ijepa

        import_official_ijepa(official_ijepa)  # a wrong folder is refused before anything is timed
    ceilings = [_child("measure_ceiling", {"device": device, "threads": threads})]
    # Rounds interleave the cases, so a change of machine load hits every case alike.
    for r in range(rounds):
        for case in cases:
            log(f"round {r + 1}/{rounds}: {case['method']} {case['precision']} {case['variant']}")
            case["runs"].append(
                _child(
                    "time_training_step",
                    {
                        "overrides": case["overrides"],
                        "steps": steps,
                        "warmup": warmup,
                        "device": device,
                        "threads": threads,
                    },
                )
            )
    ceilings.append(_child("measure_ceiling", {"device": device, "threads": threads}))
    ceiling = {p: max(c[p] for c in ceilings) for p in PRECISIONS}
    for case in cases:
        runs = case.pop("runs")
        case.update({k: runs[0][k] for k in ("losses", "flops", "batch_size", "workers", "threads")})
        case["seconds"] = [s for run in runs for s in run["seconds"]]
        # The machine's speed drifts over minutes (shared hosts): each round's median shows how much.
        case["round_medians_s"] = [statistics.median(run["seconds"]) for run in runs]
        case["loop_seconds"] = [s for run in runs for s in run["loop_seconds"]]
        case["waits"] = [w for run in runs for w in run["waits"]]
        case["data_seconds_per_batch"] = statistics.median(run["data_seconds_per_batch"] for run in runs)
        case["peak_memory_mib"] = max(run["peak_memory_mib"] for run in runs)
        case["flops"] = case["flops"] * len(runs)
        case["losses_every_round"] = [run["losses"] for run in runs]
        case.update(summarise(case, ceiling, peak_tflops))
    check_numerics(cases, rtol)
    result = {
        "device": device,
        "threads": cases[0]["threads"] if cases else threads,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "ceiling_gflops": ceiling,
        "cases": cases,
        "skipped": skipped,
        "loss_rtol": rtol,
        "torch": torch.__version__,
    }
    if official_ijepa is not None and "ijepa" in methods:
        result["official"] = {"checkout": official_ijepa, "batches": steps, "pairs": pairs, "cases": {}}
        for precision in precisions:
            log(f"ijepa {precision}: ours against the official step, {pairs} pairs of passes")
            ov = case_overrides("ijepa", precision, "fast", gpu_cases, compile, overrides)
            result["official"]["cases"][precision] = _child(
                "time_against_official",
                {
                    "checkout": official_ijepa,
                    "overrides": ov,
                    "batches": steps,
                    "pairs": pairs,
                    "device": device,
                    "threads": threads,
                },
            )
    if probe is not None:
        log("linear probe: feature cache and head grid")
        result["linear_probe"] = _child("time_linear_probe", {"overrides": probe, "threads": threads})
        log("task stages: training step with each attention kernel")
        result["task_stages"] = _child("time_task_stages", {"overrides": probe, "threads": threads})
    return result


def _batch_size(overrides: list[str]) -> int:
    from benchmark.config import load_config

    return int(load_config(overrides).pretrain.batch_size)


def tables(result: dict):
    """The rich tables `bench perf` prints."""
    from rich.table import Table

    c = result["ceiling_gflops"]
    title = (
        f"training step on {result['device']}, {result['threads']} threads, median of "
        f"{result['steps']} x {result['rounds']} steps after {result['warmup']} warm-up (s/step: the step alone on "
        f"built batches, each seen once untimed first; rounds: the lowest and highest median of one round; "
        f"loop s/step: fed by the default "
        f"loader workers); matmul ceiling "
        f"{c['fp32']:.0f} GFLOP/s fp32, {c['bf16']:.0f} bf16"
    )
    step = Table(title=title)
    columns = [
        "method",
        "precision",
        "variant",
        "s/step",
        "rounds",
        "img/s",
        "GFLOP/step",
        "GFLOP/s",
        "of ceiling",
        "peak MiB",
        "data s/batch",
        "loop s/step",
        "wait s",
        "losses vs eager",
    ]
    for col in columns:
        step.add_column(col, justify="left" if col in ("method", "precision", "variant") else "right")
    for case in result["cases"]:
        check = (
            ""
            if case["variant"] == "eager"
            else f"{'equal' if case['equal_numerics'] else 'DIFFER'} ({case['loss_rel_diff_vs_eager']:.1e})"
        )
        lo, hi = min(case["round_medians_s"]), max(case["round_medians_s"])
        step.add_row(
            case["method"],
            case["precision"],
            case["variant"],
            f"{case['s_per_step']:.3f}",
            f"{lo:.3f}-{hi:.3f}" if len(case["round_medians_s"]) > 1 else "-",
            f"{case['images_per_s']:.1f}",
            f"{case['gflop_per_step']:.1f}",
            f"{case['gflops']:.0f}",
            f"{100 * case['ceiling_fraction']:.0f}%",
            f"{case['peak_memory_mib']:.0f}",
            f"{case['data_s_per_batch']:.3f}",
            f"{case['loop_s_per_step']:.3f}",
            f"{case['wait_s_per_step']:.3f}",
            check,
        )
    out = [step]
    probe = result.get("linear_probe")
    if probe:
        t = Table(
            title=f"linear probe: {probe['heads']} heads, {probe['epochs']} epochs, "
            f"{probe['samples']} x {probe['feature_dim']} features"
        )
        t.caption = (
            f"pooled features: {probe['features_first_seconds']:.2f} s extracted, "
            f"{probe['features_cached_seconds']:.4f} s from the cache for every later probe"
        )
        for col in (
            "grid, one pass",
            "baseline: the same heads one at a time",
            "baseline s",
            "speed-up",
            "heads with |w diff| < 1e-4",
            "heads with equal top-1",
            "worst |w diff| (lr)",
        ):
            t.add_column(col, justify="right")

        def agreement(cmp):
            diffs, same = cmp["max_weight_diff"], cmp["same_train_top1"]
            worst = max(range(len(diffs)), key=diffs.__getitem__)
            return (
                f"{sum(d < 1e-4 for d in diffs)}/{len(diffs)}",
                f"{sum(same)}/{len(same)}",
                f"{diffs[worst]:.1e} ({probe['lrs'][worst]:g})",
            )

        for name, key, speedup, cmp in (
            ("same code, one head per call", "one_at_a_time_seconds", "speedup", "grid_vs_one_at_a_time"),
            ("nn.Linear + torch.optim.SGD", "torch_sgd_seconds", "speedup_vs_torch_sgd", "grid_vs_torch_sgd"),
        ):
            t.add_row(
                f"{probe['grid_seconds']:.2f} s",
                name,
                f"{probe[key]:.2f} s",
                f"{probe[speedup]:.1f}x",
                *agreement(probe[cmp]),
            )
        t.add_row("", "(the two baselines against each other)", "", "", *agreement(probe["one_at_a_time_vs_torch_sgd"]))
        out.append(t)
    stages = result.get("task_stages")
    if stages:
        t = Table(
            title="task stages: training step (real adapter and loop), attention kernel fused SDPA vs the "
            "default auto (math under bf16 on CPU); median of 3 interleaved rounds"
        )
        for col in ("stage", "inputs", "batch", "bf16", "fused s/step", "auto s/step", "speed-up"):
            t.add_column(col, justify="left" if col in ("stage", "inputs") else "right")
        for stage, m in stages.items():
            t.add_row(
                stage,
                m["inputs"],
                str(m["batch_size"]),
                "yes" if m["bf16"] else "no",
                f"{m['fused_s_per_step']:.3f}",
                f"{m['auto_s_per_step']:.3f}",
                f"{m['speedup']:.2f}x",
            )
        out.append(t)
    official = result.get("official")
    if official:
        t = Table(
            title="I-JEPA training step against the official code: same images, masks and weights, "
            f"alternating passes over {official['batches']} batches ({official['pairs']} pairs); "
            "speed-up: median and range of the paired ratios"
        )
        for col in ("precision", "ours s/step", "official s/step", "speed-up", "range", "first loss ours / official"):
            t.add_column(col, justify="left" if col == "precision" else "right")
        for precision, m in official["cases"].items():
            t.add_row(
                precision,
                f"{statistics.median(m['ours']):.3f}",
                f"{statistics.median(m['official']):.3f}",
                f"{m['speedup']:.2f}x",
                f"{min(m['ratios']):.2f}-{max(m['ratios']):.2f}x",
                f"{m['first_loss']['ours']:.6f} / {m['first_loss']['official']:.6f}",
            )
        out.append(t)
    return out
