"""`bench perf --data-path`: images/s per worker core of each method's training input pipeline,
against the official pipelines on the same files.

The files are generated JPEGs of ImageNet's sizes (about 500x375, quality 90, textured, about
100 KiB each). Every pipeline runs in one process with one torch thread over all of them (page
cache warm, one untimed batch first); its rate is images per CPU second of that process (and
per wall-clock second, which on a shared machine also counts the time others ran). Rounds
interleave the pipelines, the order reversed every other round, so a drift of the machine's
speed falls on every pipeline alike. Round r draws its crops and masks anew on every side (ours:
epoch r; the official ones: global seeds and sample order r), so which side happened to draw the
costlier views averages out over rounds.

- Ours is what the pretraining loader runs: `train_loader` (per-sample seeded views in
  `loading.Transformed`, seeded batches) over our ImageFolder, with `method.train_transform()`
  and `method.collate`.
- The official ones are imported from checkouts and fed as their training scripts feed them
  (benchmark/perf/official_pipelines.py).

Images/s counts the images of the collated batches. With `workers`, our pipelines are also
timed through the pretraining loader with that many worker processes. With a peak rate, the
training-step FLOPs per image of each method's ViT-B/16 case (`--gpu-cases`) are counted on fake
tensors (shapes only, no compute) and turned into the worker cores one GPU needs.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark.perf.common import PerfError
from benchmark.perf.official_pipelines import OFFICIAL_NAMES, official_pipeline
from methods import METHODS

# ImageNet's commonest sizes (width, height), cycled over the files.
JPEG_SIZES = ((500, 375), (500, 333), (375, 500), (500, 400))
JPEG_QUALITY = 90
CLASSES = 4
# The model FLOP utilisation the worker count is sized for.
DEFAULT_MFU = 0.4


# --- the files -------------------------------------------------------------------------------
def render_jpeg(index: int) -> Image.Image:
    """A deterministic textured RGB image: a smooth colour field, stripes and noise."""
    width, height = JPEG_SIZES[index % len(JPEG_SIZES)]
    rng = np.random.default_rng(index)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(3):
        fx, fy = rng.uniform(0.01, 0.2, 2)
        pixels += np.sin(fx * x + fy * y + rng.uniform(0, 2 * math.pi))[..., None] * rng.uniform(10, 30, 3)
    pixels += rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_jpegs(root: str | Path, count: int) -> list[Path]:
    """`count` JPEGs in CLASSES class folders under root (an image-folder dataset)."""
    paths = []
    for i in range(count):
        path = Path(root) / f"n{i % CLASSES:02d}" / f"{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_jpeg(i).save(path, quality=JPEG_QUALITY)
        paths.append(path)
    return paths


# --- timing (in a fresh process) -------------------------------------------------------------
def _seed_globals(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _one_pass(make_loader, count, draws: int, limit: int | None = None) -> dict:
    """Wall and CPU seconds (this process), images and batches of one pass (the first `limit`
    batches only, if given)."""
    start, cpu = time.perf_counter(), time.process_time()
    images, batches = 0, 0
    for batch in make_loader(draws):
        images += count(batch)
        batches += 1
        if batches == limit:
            break
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "images": images,
        "batches": batches,
    }


class _Cycled(torch.utils.data.Dataset):
    """A dataset seen `times` times over (the worker timing needs more batches than files)."""

    def __init__(self, base, times: int):
        self.base, self.times = base, times

    def __len__(self) -> int:
        return len(self.base) * self.times

    def __getitem__(self, index: int):
        return self.base[index % len(self.base)]


def time_data_path(folder: str, cases: list[dict], rounds: int, workers: int = 0) -> dict:
    """Images/s of each pipeline on one core, in interleaved rounds (one measurement process).

    cases: {"preset", "overrides", "official": checkout or None}, one per method preset.
    """
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder as TorchvisionFolder

    from benchmark.config import load_config
    from benchmark.core.data import ImageFolder
    from benchmark.core.loading import train_loader
    from benchmark.core.threads import usable_cpus
    from methods import build_method

    torch.set_num_threads(1)
    files = sorted(p for p in Path(folder).rglob("*.JPEG"))
    for path in files:  # the page cache: every pass reads from memory
        path.read_bytes()
    ours_data = ImageFolder(folder)
    pipelines = []
    for case in cases:
        cfg = load_config(case["overrides"])
        batch_size = int(cfg.pretrain.batch_size)
        method = build_method(
            cfg.method.name, OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.method), cfg.data.image_size
        )
        transform = method.train_transform()

        def ours(draws, method=method, transform=transform, cfg=cfg, batch_size=batch_size):
            return train_loader(ours_data, transform, method.collate, batch_size, cfg.seed, draws)

        pipelines.append(
            {
                "preset": case["preset"],
                "method": cfg.method.name,
                "side": "ours",
                "batch_size": batch_size,
                "make": ours,
                "count": lambda batch: len(batch["labels"]),
                "built": (method, transform, cfg),
            }
        )
        if case["official"]:
            transform, collate, count = official_pipeline(
                METHODS[cfg.method.name].official_pipeline, case["official"], cfg
            )
            data = TorchvisionFolder(folder, transform=transform)

            def theirs(draws, data=data, collate=collate, batch_size=batch_size):
                _seed_globals(draws)
                sampler = RandomSampler(data, generator=torch.Generator().manual_seed(draws))
                return DataLoader(data, batch_size, sampler=sampler, collate_fn=collate, drop_last=True)

            pipelines.append(
                {
                    "preset": case["preset"],
                    "method": cfg.method.name,
                    "side": "official",
                    "batch_size": batch_size,
                    "make": theirs,
                    "count": count,
                }
            )
    for p in pipelines:  # first calls (lazy imports, plugin set-up) outside the timings
        _one_pass(p["make"], p["count"], 0, limit=1)
        p["passes"] = []
    for r in range(rounds):
        for p in pipelines if r % 2 == 0 else pipelines[::-1]:
            p["passes"].append(_one_pass(p["make"], p["count"], r))
    if workers:
        for p in [p for p in pipelines if p["side"] == "ours"]:
            method, transform, cfg = p["built"]
            # Two batches per worker at least, so that every worker works.
            data = _Cycled(ours_data, math.ceil(2 * workers * p["batch_size"] / len(ours_data)))

            def loader(draws, data=data, transform=transform, method=method, cfg=cfg, batch_size=p["batch_size"]):
                return train_loader(data, transform, method.collate, batch_size, cfg.seed, draws, workers=workers)

            p["worker_passes"] = [_one_pass(loader, p["count"], r) for r in range(rounds)]
    for p in pipelines:
        for key in ("make", "count", "built"):
            p.pop(key, None)
    return {
        "files": len(files),
        "file_kib_mean": statistics.mean(path.stat().st_size for path in files) / 1024,
        "pipelines": pipelines,
        "threads": torch.get_num_threads(),
        "cpus": usable_cpus(),
    }


def count_step_flops(folder: str, overrides: list[str], batches: int, fake: bool = True) -> dict:
    """Training-step FLOPs per image of one case (forward, loss, backward) over `batches` real
    batches of the generated files, counted on fake tensors (exact shapes, no compute; `fake=False`
    computes)."""
    from contextlib import nullcontext

    from omegaconf import OmegaConf
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from benchmark.config import load_config
    from benchmark.core.data import ImageFolder
    from benchmark.core.loading import train_loader
    from benchmark.step import forward_loss
    from methods import build_method

    cfg = load_config(overrides)
    torch.manual_seed(cfg.seed)
    method = build_method(
        cfg.method.name, OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.method), cfg.data.image_size
    ).train()
    data = ImageFolder(folder)
    size = int(cfg.pretrain.batch_size)
    flops, images = 0, 0
    for epoch in range(batches):
        cycled = _Cycled(data, math.ceil(size / len(data)))
        batch = next(iter(train_loader(cycled, method.train_transform(), method.collate, size, 0, epoch)))
        shapes_only = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
        with shapes_only, FlopCounterMode(display=False) as counter:
            forward_loss(method.training_step, batch, torch.device("cpu"), bool(cfg.pretrain.bf16)).backward()
        method.zero_grad(set_to_none=True)
        flops += counter.get_total_flops()
        images += size
    return {"flops_per_image": flops / images, "batch_size": size, "batches": batches, "model": cfg.model.name}


# --- the whole measurement -------------------------------------------------------------------
def data_path_overrides(preset: str, extra: list[str]) -> list[str]:
    """A preset's data-path case: its ViT-B/16 224 px case (`--gpu-cases`), the user's overrides,
    and a one-block encoder (views and masks depend on the patch grid, not on the depth)."""
    from benchmark.perf.cases import case_overrides

    return [*case_overrides(preset, "bf16", "fast", True, False, extra), "model.depth=1"]


def summarise_data_path(raw: dict, peak_tflops: float | None, mfu: float, flops: dict) -> dict:
    """Per pipeline: images per CPU second of every round (and per wall second), median and range;
    per method: ours over official, round by round."""
    rows = []
    for p in raw["pipelines"]:
        rates = [q["images"] / q["cpu_seconds"] for q in p["passes"]]
        wall = [q["images"] / q["seconds"] for q in p["passes"]]
        row = {
            **p,
            "images_per_s": rates,
            "median_images_per_s": statistics.median(rates),
            "min_images_per_s": min(rates),
            "max_images_per_s": max(rates),
            "wall_images_per_s": wall,
            "median_wall_images_per_s": statistics.median(wall),
        }
        if "worker_passes" in p:
            worker_rates = [q["images"] / q["seconds"] for q in p["worker_passes"]]
            row["workers_images_per_s"] = statistics.median(worker_rates)
            row["workers_range"] = [min(worker_rates), max(worker_rates)]
        rows.append(row)
    pairs = {}
    for ours in [r for r in rows if r["side"] == "ours"]:
        theirs = next((r for r in rows if r["side"] == "official" and r["preset"] == ours["preset"]), None)
        if theirs is not None:
            ratios = [a / b for a, b in zip(ours["images_per_s"], theirs["images_per_s"])]
            wall = [a / b for a, b in zip(ours["wall_images_per_s"], theirs["wall_images_per_s"])]
            pairs[ours["preset"]] = {
                "official": OFFICIAL_NAMES[METHODS[ours["method"]].official_pipeline],
                "ratios": ratios,
                "ratio": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "wall_ratios": wall,
                "wall_ratio": statistics.median(wall),
            }
    gpu = {}
    for preset, count in flops.items():
        ours = next(r for r in rows if r["side"] == "ours" and r["preset"] == preset)
        entry = {**count, "gflop_per_image": count["flops_per_image"] / 1e9}
        if peak_tflops:
            entry["images_per_s_needed"] = mfu * peak_tflops * 1e12 / count["flops_per_image"]
            entry["cores_needed"] = entry["images_per_s_needed"] / ours["median_images_per_s"]
        gpu[preset] = entry
    return {"pipelines": rows, "pairs": pairs, "gpu": gpu}


def run_data_path(
    methods: list[str],
    overrides: list[str],
    official: dict[str, str],
    images: int,
    rounds: int,
    workers: int = 0,
    peak_tflops: float | None = None,
    mfu: float = DEFAULT_MFU,
    flop_batches: int = 2,
    log=print,
) -> dict:
    """The data-path benchmark: files written to a temporary folder, every pipeline timed in one
    fresh process, FLOPs counted (with a peak rate) in one fresh process per method."""
    import tempfile

    from benchmark.config import load_config
    from benchmark.perf.suite import _child

    cases = []
    for preset in methods:
        ov = data_path_overrides(preset, overrides)
        cfg = load_config(ov)
        kind = METHODS[cfg.method.name].official_pipeline
        checkout = official.get(kind) if kind else None
        if checkout:
            official_pipeline(kind, checkout, cfg)  # refused here, before anything is timed
        cases.append({"preset": preset, "overrides": ov, "official": checkout})
    sizes = {int(load_config(c["overrides"]).pretrain.batch_size) for c in cases}
    # Every batch full on every side: the file count is a multiple of every batch size.
    step = math.lcm(*sizes)
    files = images // step * step
    if files == 0:
        raise PerfError(f"--data-images {images} holds no whole batch of every method (batch sizes {sorted(sizes)})")
    with tempfile.TemporaryDirectory(prefix="bench-data-path-") as folder:
        log(f"data path: writing {files} JPEGs")
        write_jpegs(folder, files)
        log(f"data path: {len(cases)} methods, {rounds} interleaved rounds over {files} files, one core each")
        raw = _child("time_data_path", {"folder": folder, "cases": cases, "rounds": rounds, "workers": workers})
        flops = {}
        if peak_tflops:
            for case in cases:
                log(f"data path: training-step FLOPs of {case['preset']} at ViT-B/16 (fake tensors)")
                ov = data_path_overrides(case["preset"], overrides)[:-1]  # the full encoder
                flops[case["preset"]] = _child(
                    "count_step_flops", {"folder": folder, "overrides": ov, "batches": flop_batches}
                )
    result = {
        "mode": "data_path",
        "image_size": int(load_config(cases[0]["overrides"]).data.image_size) if cases else None,
        "files": raw["files"],
        "file_kib_mean": raw["file_kib_mean"],
        "jpeg_quality": JPEG_QUALITY,
        "rounds": rounds,
        "threads_per_pipeline": raw["threads"],
        "cpus": raw["cpus"],
        "workers": workers,
        "official": {k: str(Path(v).expanduser().absolute()) for k, v in official.items() if v},
        "peak_tflops": peak_tflops,
        "mfu": mfu,
        "cases": cases,
        "torch": torch.__version__,
    }
    result.update(summarise_data_path(raw, peak_tflops, mfu, flops))
    return result


def data_path_tables(result: dict):
    """The rich tables `bench perf --data-path` prints."""
    from benchmark.perf.report import column_table

    columns = ["method", "pipeline", "batch", "img/s per core", "rounds", "ms/img", "ours/official", "range"]
    columns += ["wall img/s", "wall ours/official"]
    if result["workers"]:
        columns += [f"img/s, {result['workers']} worker{'s' if result['workers'] > 1 else ''}", "per worker"]
    t = column_table(
        f"data path at {result['image_size']} px: images per CPU second of one process with one thread "
        f"(one core), {result['files']} JPEGs of {result['file_kib_mean']:.0f} KiB on average, median of "
        f"{result['rounds']} interleaved rounds; ours/official: median and range of the per-round ratios; wall: "
        "the same per second of wall-clock time",
        columns,
        left=("method", "pipeline"),
    )
    for p in result["pipelines"]:
        pair = result["pairs"].get(p["preset"]) if p["side"] == "ours" else None
        cells = [
            p["preset"],
            "ours" if p["side"] == "ours" else OFFICIAL_NAMES[METHODS[p["method"]].official_pipeline],
            str(p["batch_size"]),
            f"{p['median_images_per_s']:.1f}",
            f"{p['min_images_per_s']:.1f}-{p['max_images_per_s']:.1f}" if result["rounds"] > 1 else "-",
            f"{1e3 / p['median_images_per_s']:.2f}",
            f"{pair['ratio']:.2f}x" if pair else "",
            f"{pair['min']:.2f}-{pair['max']:.2f}x" if pair else "",
            f"{p['median_wall_images_per_s']:.1f}",
            f"{pair['wall_ratio']:.2f}x" if pair else "",
        ]
        if result["workers"]:
            total = p.get("workers_images_per_s")
            cells += [f"{total:.0f}", f"{total / result['workers']:.1f}"] if total else ["", ""]
        t.add_row(*cells)
    out = [t]
    if result["gpu"]:
        peak = result["peak_tflops"]
        g = column_table(
            f"worker cores one GPU needs: training-step FLOPs per image of the ViT-B/16 case (counted), "
            f"at {100 * result['mfu']:.0f} % of {peak:g} TFLOP/s, fed at our images/s per core above "
            f"({result['cpus']} cores here)",
            ("method", "GFLOP/image", "img/s the GPU takes", "cores"),
            left=("method",),
        )
        for preset, e in result["gpu"].items():
            needed, cores = e.get("images_per_s_needed", math.nan), e.get("cores_needed", math.nan)
            g.add_row(preset, f"{e['gflop_per_image']:.1f}", f"{needed:.0f}", f"{cores:.1f}")
        out.append(g)
    return out
