"""`bench perf --data-path` measures what it says: the images counted are the images the pipelines
produced, every pipeline runs in every round, official checkouts are checked before compute; and
the loader's batched fetch computes the views the per-sample code computed.

Speed itself is never asserted: it depends on the machine and its load.
"""

import json
import os
import random
import statistics

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from benchmark.core.loading import SeededBatches, Transformed, train_loader
from benchmark.perf import datapath

# Small batches over a handful of files: every method's pipeline in seconds.
TINY = ["pretrain.batch_size=4"]
METHODS = ["ijepa", "iwm", "mae", "dino"]
# The official code is not shipped: its tests run where these name checkouts of
# facebookresearch/ijepa, mae and dino.
CHECKOUTS = {kind: os.environ.get(f"{kind.upper()}_CHECKOUT") for kind in ("ijepa", "mae", "dino")}
needs_checkouts = pytest.mark.skipif(
    not all(CHECKOUTS.values()), reason="IJEPA_CHECKOUT, MAE_CHECKOUT and DINO_CHECKOUT (official checkouts) not set"
)


def container(cfg) -> dict:
    return OmegaConf.to_container(cfg)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    datapath.write_jpegs(folder, 6)
    return folder


def test_generated_jpegs_are_imagenet_sized_textured_and_deterministic(jpegs):
    paths = sorted(jpegs.rglob("*.JPEG"))
    assert len(paths) == 6 and len({p.parent for p in paths}) == datapath.CLASSES
    with Image.open(paths[0]) as img:
        assert img.format == "JPEG" and img.size == datapath.JPEG_SIZES[0] and img.mode == "RGB"
        assert np.asarray(img).std() > 20  # texture, not a flat colour
    assert 50_000 < statistics.mean(p.stat().st_size for p in paths) < 200_000
    assert np.array_equal(np.asarray(datapath.render_jpeg(3)), np.asarray(datapath.render_jpeg(3)))


def test_images_per_second_count_the_images_the_pipelines_produced(jpegs, monkeypatch):
    """Every pass decodes each file once and collates it into exactly one batch row."""
    from benchmark.core.data import ImageFolder

    decoded = []
    plain = ImageFolder.__getitem__
    monkeypatch.setattr(ImageFolder, "__getitem__", lambda self, i: decoded.append(i) or plain(self, i))
    threads = torch.get_num_threads()
    cases = [
        {"preset": m, "overrides": datapath.data_path_overrides(m, ["pretrain.batch_size=2"]), "official": None}
        for m in ("mae", "ijepa")
    ]
    try:
        raw = datapath.time_data_path(str(jpegs), cases, rounds=2)
    finally:
        torch.set_num_threads(threads)
    assert raw["files"] == 6 and raw["threads"] == 1
    for p in raw["pipelines"]:
        assert [q["images"] for q in p["passes"]] == [6, 6]
        assert all(q["batches"] * p["batch_size"] == q["images"] for q in p["passes"])
    # One warm-up batch and two full passes per pipeline.
    assert len(decoded) == 2 * (2 + 2 * 6)
    assert sorted(decoded[4:10]) == list(range(6))  # the first full pass: every file once
    summary = datapath.summarise_data_path(raw, None, 0.4, {})
    for row, p in zip(summary["pipelines"], raw["pipelines"]):
        assert row["images_per_s"] == [q["images"] / q["cpu_seconds"] for q in p["passes"]]
        assert row["wall_images_per_s"] == [q["images"] / q["seconds"] for q in p["passes"]]
        assert row["median_images_per_s"] == statistics.median(row["images_per_s"]) > 0


def test_pairs_and_cores_are_computed_from_the_rounds():
    def pipeline(side, seconds):
        passes = [{"seconds": 2 * s, "cpu_seconds": s, "images": 100, "batches": 4} for s in seconds]
        return {"preset": "mae", "method": "mae", "side": side, "batch_size": 25, "passes": passes}

    raw = {"pipelines": [pipeline("ours", [1.0, 2.0, 1.0]), pipeline("official", [2.0, 2.0, 0.5])]}
    flops = {"mae": {"flops_per_image": 50e9, "batch_size": 128, "batches": 2, "model": "vit_base"}}
    out = datapath.summarise_data_path(raw, 1000.0, 0.4, flops)
    pair = out["pairs"]["mae"]
    assert pair["ratios"] == pytest.approx([2.0, 1.0, 0.5]) and pair["ratio"] == pytest.approx(1.0)
    assert (pair["min"], pair["max"], pair["official"]) == (0.5, 2.0, "official MAE")
    assert pair["wall_ratios"] == pytest.approx(pair["ratios"])  # wall: twice the CPU time on both sides
    gpu = out["gpu"]["mae"]
    assert gpu["images_per_s_needed"] == pytest.approx(0.4 * 1000e12 / 50e9)  # 8000 images/s
    assert gpu["cores_needed"] == pytest.approx(8000 / 100.0)  # at the median of ours, 100 images/s


def test_data_path_cli_times_every_method_in_every_round(bench, tmp_path):
    out = tmp_path / "data.json"
    args = ["perf", "--data-path", "--data-images", "9", "--rounds", "2", "--data-workers", "1", "--out", str(out)]
    proc = bench(*args, *TINY, check=0)
    assert "img/s per core" in proc.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "data_path" and result["image_size"] == 224
    assert result["files"] == 8  # whole batches only
    assert [p["preset"] for p in result["pipelines"]] == METHODS and result["pairs"] == {}
    for p in result["pipelines"]:
        assert p["side"] == "ours" and p["batch_size"] == 4
        assert [q["images"] for q in p["passes"]] == [8, 8] and all(q["batches"] == 2 for q in p["passes"])
        assert p["images_per_s"] == pytest.approx([q["images"] / q["cpu_seconds"] for q in p["passes"]])
        assert 0 < p["median_wall_images_per_s"] and all(q["cpu_seconds"] > 0 for q in p["passes"])
        assert 0 < p["min_images_per_s"] <= p["median_images_per_s"] <= p["max_images_per_s"]
        assert [q["images"] for q in p["worker_passes"]] == [8, 8] and p["workers_images_per_s"] > 0


def test_official_checkouts_are_checked_before_compute(bench, tmp_path):
    missing = tmp_path / "missing"
    for kind in ("ijepa", "mae", "dino"):
        proc = bench("perf", "--data-path", f"--official-{kind}", str(missing), check=2)
        assert f"is not a checkout of facebookresearch/{kind}" in proc.stderr and proc.stderr.count("\n") == 1
    (tmp_path / "main_pretrain.py").write_text("transform = None\n")
    proc = bench("perf", "--data-path", "--official-mae", str(tmp_path), check=2)
    assert "one `transform_train = ...`" in proc.stderr and proc.stderr.count("\n") == 1
    proc = bench("perf", "--official-dino", str(missing), check=2)
    assert "add --data-path" in proc.stderr


def test_fake_tensor_flop_count_equals_the_computed_one(jpegs):
    tiny = [
        "method=ijepa",
        "model=vit_micro",
        "model.depth=2",
        "data.image_size=32",
        "model.patch_size=4",
        "method.predictor.depth=1",
        "method.predictor.width=48",
        "pretrain.batch_size=3",
    ]
    fake = datapath.count_step_flops(str(jpegs), tiny, batches=2)
    real = datapath.count_step_flops(str(jpegs), tiny, batches=2, fake=False)
    assert fake["flops_per_image"] == real["flops_per_image"] > 0


def _per_sample_reference(base, transform, key):
    """The per-sample seeding as the loader did it before batched fetches: torch.manual_seed,
    every state saved and restored around one view."""
    index, sample_seed, batch_seed = key
    image, label = base[index]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            view = transform(image)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return view, label, batch_seed


def test_batched_fetch_gives_the_per_sample_views_and_restores_every_rng(jpegs):
    from benchmark.core.data import ImageFolder
    from benchmark.core.transforms import crop_transform

    crop = crop_transform(32, (0.2, 1.0), flip=True)

    def transform(image):  # draws from all three global RNGs
        return crop(image), torch.rand(3), random.random(), np.random.rand()

    base = ImageFolder(jpegs)
    dataset = Transformed(base, transform)
    keys = next(iter(SeededBatches(len(base), 4, seed=3, epoch=1)))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    batched = dataset.__getitems__(keys)
    after = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    for key, ours in zip(keys, batched):
        (view, noise, r, n), label, seed = ours
        (view_ref, noise_ref, r_ref, n_ref), label_ref, seed_ref = _per_sample_reference(base, transform, key)
        assert torch.equal(view, view_ref) and torch.equal(noise, noise_ref) and (r, n) == (r_ref, n_ref)
        assert (label, seed) == (label_ref, seed_ref)
    assert torch.equal(dataset[keys[2]][0][0], batched[2][0][0])


@needs_checkouts
def test_paired_pipelines_do_the_same_work(jpegs):
    """MAE's and DINO's official views equal ours from the same seeds, pixel for pixel; I-JEPA's
    official crop takes the same box but resamples bilinearly where ours is bicubic."""
    from benchmark.config import load_config
    from methods import METHODS, build_method

    with Image.open(sorted(jpegs.rglob("*.JPEG"))[0]) as img:
        image = img.convert("RGB")
    for preset in ("mae", "dino", "ijepa"):
        cfg = load_config(datapath.data_path_overrides(preset, TINY))
        method = build_method(cfg.method.name, container(cfg.model), container(cfg.method), cfg.data.image_size)
        kind = METHODS[cfg.method.name].official_pipeline
        theirs, _, _ = datapath.official_pipeline(kind, CHECKOUTS[kind], cfg)
        ours = method.train_transform()
        for seed in range(3):
            views = []
            for transform in (ours, theirs):
                datapath._seed_globals(seed)
                view = transform(image)
                views.append(view["image"] if isinstance(view, dict) else view)
            if preset == "ijepa":
                assert views[0].shape == views[1].shape and not torch.equal(views[0], views[1])
            else:
                for a, b in zip(*(v if isinstance(v, list) else [v] for v in views)):
                    assert torch.equal(a, b)


@needs_checkouts
def test_official_pipelines_are_timed_in_the_same_rounds(jpegs):
    threads = torch.get_num_threads()
    cases = [
        {"preset": m, "overrides": datapath.data_path_overrides(m, ["pretrain.batch_size=3"]), "official": CHECKOUTS[m]}
        for m in ("ijepa", "mae", "dino")
    ]
    try:
        raw = datapath.time_data_path(str(jpegs), cases, rounds=2)
    finally:
        torch.set_num_threads(threads)
    assert [(p["preset"], p["side"]) for p in raw["pipelines"]] == [
        (m, side) for m in ("ijepa", "mae", "dino") for side in ("ours", "official")
    ]
    assert all([q["images"] for q in p["passes"]] == [6, 6] for p in raw["pipelines"])
    summary = datapath.summarise_data_path(raw, None, 0.4, {})
    assert set(summary["pairs"]) == {"ijepa", "mae", "dino"}
    assert all(len(pair["ratios"]) == 2 and pair["ratio"] > 0 for pair in summary["pairs"].values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_pretraining_batches_reach_the_gpu_pinned_and_unchanged(jpegs):
    from benchmark.config import load_config
    from benchmark.core.data import ImageFolder
    from benchmark.core.layers import to_device
    from methods import build_method

    cfg = load_config(datapath.data_path_overrides("ijepa", ["pretrain.batch_size=3"]))
    method = build_method(cfg.method.name, container(cfg.model), container(cfg.method), cfg.data.image_size)
    data = ImageFolder(jpegs)
    args = (data, method.train_transform(), method.collate, 3, 0, 0)
    pinned = next(iter(train_loader(*args, workers=1, pin_memory=True)))
    plain = next(iter(train_loader(*args)))
    assert pinned["images"].is_pinned()
    on_gpu = to_device(pinned, torch.device("cuda"))
    assert on_gpu["images"].is_cuda and torch.equal(on_gpu["images"].cpu(), plain["images"])
    assert torch.equal(on_gpu["ctx_idx"].cpu(), plain["ctx_idx"])
