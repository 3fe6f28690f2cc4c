import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.core import synthetic
from benchmark.core.data import DataError, ImageFolder
from benchmark.core.loading import WORKER_NICENESS, SeededBatches, eval_loader, train_loader
from benchmark.core.transforms import crop_transform

# Version 3's first three train images at 32 px (seed 0), as its generator drew them.
V3_DIGESTS = ["057464e54192", "5e4dee983c74", "1677b2e0ce80"]
V3_LABELS = {"shape": "ring", "colour": "green"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("gen") / "shapes", 24, 8, 32, seed=5)


@pytest.mark.parametrize("version", synthetic.VERSIONS)
def test_generator_is_deterministic_and_differs_across_seeds(version):
    a = np.array(synthetic.render(0, "train", 3, 32, version)[0])
    b = np.array(synthetic.render(0, "train", 3, 32, version)[0])
    c = np.array(synthetic.render(1, "train", 3, 32, version)[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_version_3_is_still_the_data_it_was():
    """data.version=3 reproduces the data before version 4, pixel for pixel (digests of images
    rendered by the version-3 generator when it was the only one)."""
    import hashlib

    digests = [
        hashlib.sha1(np.array(synthetic.render(0, "train", i, 32, 3)[0]).tobytes()).hexdigest()[:12] for i in range(3)
    ]
    assert digests == V3_DIGESTS
    assert synthetic.render(0, "train", 0, 32, 3)[2] == V3_LABELS
    with pytest.raises(ValueError, match="unknown generator version 2"):
        synthetic.render(0, "train", 0, 32, 2)


def _region_sizes(mask: np.ndarray) -> list[int]:
    """Pixel counts of the 8-connected regions of a boolean mask (a plain flood fill)."""
    seen, sizes = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        sizes.append(size)
    return sizes


def test_version_4_counts_separated_shapes_of_unrelated_sizes():
    """Every count 1-4 occurs, the shapes never touch (each is its own region of the label map),
    and the covered area overlaps between counts, so it does not give the count away."""
    areas: dict[int, list[int]] = {}
    for i in range(60):
        _, labels, classes = synthetic.render(0, "train", i, 64, 4)
        labels = np.array(labels)
        count, colour = int(classes["count"]), synthetic.colours(4).index(classes["colour"])
        assert set(np.unique(labels)) == {1, 2 + colour}
        # One region per shape (8-connected; a star's tip a pixel wide may break off when the
        # supersampled label map is resized: regions under 6 pixels are not counted).
        assert sum(size >= 6 for size in _region_sizes(labels == 2 + colour)) == count
        areas.setdefault(count, []).append(int((labels == 2 + colour).sum()))
    assert sorted(areas) == [1, 2, 3, 4]
    assert max(areas[1]) > min(areas[2]) and max(areas[2]) > min(areas[3])


def test_generated_folder_has_classification_and_segmentation_layouts(shapes):
    train = ImageFolder(shapes / "train")
    assert set(train.classes) <= set(synthetic.SHAPES_V4) and len(train) == 24
    assert len(ImageFolder(shapes / "val")) == 8
    rows = list(csv.DictReader(open(shapes / "labels.csv")))
    assert len(rows) == 32 and {r["colour"] for r in rows} <= set(synthetic.colours(4))
    assert list(rows[0]) == ["split", "file", "shape", "colour", "count"]
    assert {r["count"] for r in rows} <= {"1", "2", "3", "4"}
    for row in rows:  # the class folder agrees with the recorded shape
        assert row["file"].split("/")[1] == row["shape"]
    ade = shapes / "ADEChallengeData2016"
    for split in ("training", "validation"):
        images = sorted((ade / "images" / split).glob("*.jpg"))
        labels = sorted((ade / "annotations" / split).glob("*.png"))
        assert [p.stem for p in images] == [p.stem for p in labels] and images
    label = np.array(Image.open(labels[0]))
    assert label.shape == (32, 32) and label.min() >= 1 and label.max() <= 1 + len(synthetic.colours(4))
    meta = json.loads((shapes / synthetic.DONE_FILE).read_text())
    assert meta["segmentation_classes"] == ["background", *synthetic.colours(4)] and len(meta["colours"]) == 12


@pytest.mark.parametrize("version", synthetic.VERSIONS)
def test_segmentation_label_marks_the_shapes_by_colour_class(version):
    for i in range(10):
        image, labels, classes = synthetic.render(0, "val", i, 64, version)
        colour = synthetic.colours(version).index(classes["colour"])
        labels = np.array(labels)
        counts = np.bincount(labels.ravel(), minlength=2 + len(synthetic.colours(version)))
        assert counts[2 + colour] > 0.01 * 64 * 64, "the class shapes should cover a visible part of the image"
        # Pixels labelled with the colour class are more saturated than the background ones, and
        # their hue is the class's (within its spread, plus the edge pixels blended by resizing).
        hsv = np.array(image.convert("HSV")).astype(float)
        assert hsv[labels == 2 + colour, 1].mean() > hsv[labels == 1, 1].mean() + 20
        centre = (synthetic.COLOURS_V4 if version == 4 else synthetic.COLOURS_V3)[classes["colour"]]
        off = np.abs((hsv[labels == 2 + colour, 0] * 360 / 256 - centre + 180) % 360 - 180)
        assert np.median(off) < synthetic.COLOUR_SPREAD[version] + 4


def test_generation_reuses_a_complete_copy(shapes):
    marker = shapes / synthetic.DONE_FILE
    before = marker.stat().st_mtime_ns
    synthetic.generate(shapes, 24, 8, 32, seed=5)
    assert marker.stat().st_mtime_ns == before


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "noimg")


def test_image_folder_converts_grayscale_and_alpha_to_rgb(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("L", (10, 12), 128).save(tmp_path / "a" / "g.png")
    Image.new("RGBA", (10, 12), (1, 2, 3, 0)).save(tmp_path / "a" / "t.png")
    ds = ImageFolder(tmp_path)
    assert all(ds[i][0].mode == "RGB" for i in range(2))


def test_batches_do_not_depend_on_workers_and_resume_mid_epoch(shapes):
    ds = ImageFolder(shapes / "train")
    transform = crop_transform(32, (0.3, 1.0))

    def collate(items):
        return torch.stack([v for v, _, _ in items])

    full = list(train_loader(ds, transform, collate, 4, seed=1, epoch=2, workers=0))
    threaded = list(train_loader(ds, transform, collate, 4, seed=1, epoch=2, workers=2))
    resumed = list(train_loader(ds, transform, collate, 4, seed=1, epoch=2, start=3, workers=0))
    assert len(full) == 6 and all(torch.equal(a, b) for a, b in zip(full, threaded))
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))
    other_epoch = list(train_loader(ds, transform, collate, 4, seed=1, epoch=3, workers=0))
    assert not torch.equal(full[0], other_epoch[0])


def _worker_state(_image):
    """What a loader worker sees of its own process: pid, niceness, and whether it outlives the job
    signals SLURM sends every process of a job (it sends itself SIGTERM and SIGUSR2 first)."""
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR2)
    return torch.tensor([os.getpid(), os.getpriority(os.PRIO_PROCESS, 0), 1])


def test_loader_workers_run_below_the_training_process_and_ignore_job_signals(shapes, monkeypatch):
    ds = ImageFolder(shapes / "train")
    parent_nice = os.getpriority(os.PRIO_PROCESS, 0)
    expected = min(19, parent_nice + WORKER_NICENESS)

    def collate(items):
        return torch.stack([v for v, _, _ in items])

    monkeypatch.setattr("benchmark.core.loading.eval_transform", lambda size, interpolation: _worker_state)
    for loader in (
        train_loader(ds, _worker_state, collate, 4, seed=0, epoch=0, workers=1),
        eval_loader(ds, 32, 4, workers=1),
    ):
        batch = next(iter(loader))
        states = batch if isinstance(batch, torch.Tensor) else batch["images"]
        pid, nice, ignores_term = states[0].tolist()
        assert pid != os.getpid() and nice == expected and ignores_term == 1
    # The training process itself keeps its priority and its handlers.
    assert os.getpriority(os.PRIO_PROCESS, 0) == parent_nice
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN


def test_a_job_signal_arriving_while_workers_start_does_not_kill_them(shapes, monkeypatch):
    """SLURM signals every process of a job, from outside it: a worker signalled right after its
    fork, before its own handlers are set up, must not die (the next batch would fail)."""
    import benchmark.core.loading as loading

    sender = subprocess.Popen(
        [sys.executable, "-c", "import os, sys\nfor pid in sys.stdin: os.kill(int(pid), 15)"],
        stdin=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    fork = loading.DataLoader.__iter__

    def signal_right_after_fork(self):
        batches = fork(self)
        for worker in batches._workers:
            sender.stdin.write(f"{worker.pid}\n")
        return batches

    monkeypatch.setattr(loading.DataLoader, "__iter__", signal_right_after_fork)
    ds = ImageFolder(shapes / "train")

    def collate(items):
        time.sleep(0.01)  # the epoch outlasts the signal's delivery
        return torch.stack([v for v, _, _ in items])

    try:
        for epoch in range(5):
            batches = list(train_loader(ds, crop_transform(32, (0.3, 1.0)), collate, 4, 0, epoch, workers=1))
            assert len(batches) == 6
    finally:
        sender.stdin.close()
        sender.wait()


def test_seeded_batches_cover_the_epoch_once():
    batches = list(SeededBatches(10, 3, seed=0, epoch=0))
    indices = [i for b in batches for i, _, _ in b]
    assert len(batches) == 3 and len(set(indices)) == 9
    assert len({b[0][2] for b in batches}) == 3  # one batch seed per batch


def test_label_sets_of_the_builtin_data(shapes):
    from benchmark.core.data import DataSource

    by_shape = DataSource("shapes", shapes, "train", "val", 32, shapes / "labels.csv", "shape").split("train")
    by_colour = DataSource("shapes", shapes, "train", "val", 32, shapes / "labels.csv", "colour").split("train")
    plain = ImageFolder(shapes / "train")
    assert by_shape.classes == plain.classes and by_shape.samples == plain.samples
    assert set(by_colour.classes) <= set(synthetic.colours(4)) and len(by_colour) == len(plain)
    rows = {r["file"]: r["colour"] for r in csv.DictReader(open(shapes / "labels.csv"))}
    for path, label in by_colour.samples:
        assert by_colour.classes[label] == rows[str(path.relative_to(shapes))]
    bad = DataSource("shapes", shapes, "train", "val", 32, shapes / "labels.csv", "texture")
    with pytest.raises(DataError, match="needs columns"):
        bad.split("train")


def test_builtin_splits_are_indexed_by_every_class_of_the_label_set(tmp_path):
    """A small built-in set lacks some colours in train and has others only in val: both splits
    still index the label set's full, sorted class list, so class i is the same colour in both."""
    from omegaconf import OmegaConf

    from benchmark.core.data import resolve_data

    cfg = OmegaConf.create(
        dict(kind="builtin", name="shapes", version=4, label="colour", num_train=6, num_val=6, image_size=32, seed=0)
    )
    cfg.update(skip_unreadable=False, check_headers=True)
    source = resolve_data(cfg, tmp_path)
    train, val = source.split("train"), source.split("val")
    assert train.classes == val.classes == sorted(synthetic.colours(4))
    assert set(val.present) - set(train.present), "the test needs a colour seen only in val"
    for split in (train, val):
        for path, label in split.samples:
            row = next(r for r in csv.DictReader(open(source.label_file)) if source.root / r["file"] == path)
            assert split.classes[label] == row["colour"]
    from dataclasses import replace

    assert replace(source, label_column="count").split("val").classes == ["1", "2", "3", "4"]
