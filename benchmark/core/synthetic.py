"""The built-in dataset: procedurally drawn shapes, generated deterministically onto disk.

Every image shows a scattering of three to six shapes of one class, all of one colour class
(varied shades, sizes, positions and rotations), sometimes with one small shape of another
class and colour, on a low-contrast textured background. The scene is
drawn twice: as an RGB image and as a per-pixel label map, so the same generator serves
classification (ImageFolder layout by shape; `labels.csv` carries both labels) and
semantic segmentation (ADE20k layout). Image i of a split depends only on (seed, split, i).

Layout written under `root`:
    train/<shape>/<id>.png, val/<shape>/<id>.png         classification (ImageFolder)
    labels.csv                                            split, file, shape, colour
    ADEChallengeData2016/images/{training,validation}/<id>.jpg
    ADEChallengeData2016/annotations/{training,validation}/<id>.png
                                                          0 = ignore, 1 = background,
                                                          2 + k = colour class k (COLOURS order)

The segmentation classes are the colour classes, like the default classification label: CPU-sized
models do not learn the shape classes (see docs/results.md), and a segmentation task where every model
predicts background everywhere would compare nothing.
"""

from __future__ import annotations

import colorsys
import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 3
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
# Colour classes are hue bins centred on these hues (degrees).
COLOURS = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}
SPLITS = {"train": "training", "val": "validation"}
# The label sets of labels.csv: what a classification task on the built-in data predicts.
LABELS = ("shape", "colour")
SUPERSAMPLE = 4
DONE_FILE = "DONE.json"


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of the polygonal shapes (square, triangle, hexagon, star, cross)."""

    def ring_points(n, radii):
        pts = []
        for i in range(n * len(radii)):
            a = angle + 2 * math.pi * i / (n * len(radii))
            rad = radii[i % len(radii)]
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts

    if kind == "square":
        return ring_points(4, [r])
    if kind == "triangle":
        return ring_points(3, [r])
    if kind == "hexagon":
        return ring_points(6, [r])
    if kind == "star":
        return ring_points(5, [r, 0.42 * r])
    if kind == "cross":
        w = 0.33 * r
        arm = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm]
    raise ValueError(kind)


def _draw_shape(
    draws: list[ImageDraw.ImageDraw], fills: list, kind: str, cx: float, cy: float, r: float, angle: float
) -> None:
    """Draw one shape with the matching fill on each canvas (image and label map)."""
    box = (cx - r, cy - r, cx + r, cy + r)
    for draw, fill in zip(draws, fills):
        if kind in ("circle", "ring", "crescent"):
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)


def _hole(kind: str, cx: float, cy: float, r: float, angle: float, size: int) -> Image.Image | None:
    """Mask of the part that rings and crescents cut out of their disc (None for other shapes)."""
    if kind == "ring":
        inner = 0.55 * r
        box = (cx - inner, cy - inner, cx + inner, cy + inner)
    elif kind == "crescent":
        dx, dy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        inner = 0.85 * r
        box = (cx + dx - inner, cy + dy - inner, cx + dx + inner, cy + dy + inner)
    else:
        return None
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float RGB array in [0, 1]: base colour, one random texture, pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9)))
    other = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9)))
    theta = rng.uniform(0, math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    texture = rng.integers(4)
    if texture == 0:
        t = u
    elif texture == 1:
        t = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(2, 6) * u)
    elif texture == 2:
        k = rng.uniform(3, 8)
        t = ((np.floor(xx * k) + np.floor(yy * k)) % 2).astype(np.float64)
    else:
        coarse = rng.random((5, 5))
        t = np.array(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)) / 255.0
    # Low-contrast textures: the shapes, not the background, should dominate the image.
    t = t * rng.uniform(0.2, 0.5)
    img = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    img = img + rng.normal(0, 0.03, img.shape)
    return np.clip(img, 0, 1)


def _shape_colour(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    hue = (COLOURS[colour] + rng.uniform(-15, 15)) % 360 / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def render(seed: int, split: str, index: int, size: int) -> tuple[Image.Image, Image.Image, int, int]:
    """One sample: (RGB image, label map, shape class, colour class), deterministic."""
    rng = np.random.default_rng([seed, list(SPLITS).index(split), index])
    big = size * SUPERSAMPLE
    image = Image.fromarray((_background(rng, big) * 255).astype(np.uint8))
    labels = Image.new("L", (big, big), 1)
    shape = int(rng.integers(len(SHAPES)))
    colour = int(rng.integers(len(COLOURS)))

    # A scattering of the class's shape (one colour class, varied shades and sizes), sometimes
    # with one small shape of another class among them.
    objects = [(shape, colour, rng.uniform(0.08, 0.16)) for _ in range(int(rng.integers(3, 7)))]
    if rng.random() < 0.3:
        other = int((shape + rng.integers(1, len(SHAPES))) % len(SHAPES))
        objects.insert(
            int(rng.integers(len(objects) + 1)), (other, int(rng.integers(len(COLOURS))), rng.uniform(0.06, 0.1))
        )
    for kind_id, colour_id, radius in objects:
        kind = SHAPES[kind_id]
        r = radius * big
        cx, cy = rng.uniform(r * 0.8, big - r * 0.8, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        below = (image.copy(), labels.copy())
        draws = [ImageDraw.Draw(image), ImageDraw.Draw(labels)]
        fills = [_shape_colour(rng, list(COLOURS)[colour_id]), 1 + 1 + colour_id]
        _draw_shape(draws, fills, kind, cx, cy, r, angle)
        hole = _hole(kind, cx, cy, r, angle, big)
        if hole is not None:
            image.paste(below[0], mask=hole)
            labels.paste(below[1], mask=hole)

    image = image.resize((size, size), Image.BOX)
    labels = labels.resize((size, size), Image.NEAREST)
    return image, labels, shape, colour


def dataset_id(num_train: int, num_val: int, image_size: int, seed: int) -> str:
    spec = json.dumps(
        dict(v=GENERATOR_VERSION, train=num_train, val=num_val, size=image_size, seed=seed), sort_keys=True
    )
    return f"shapes-{image_size}px-{num_train}-{num_val}-s{seed}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


def is_complete(root: Path) -> bool:
    return (Path(root) / DONE_FILE).is_file()


def generate(root: str | Path, num_train: int, num_val: int, image_size: int, seed: int) -> Path:
    """Write the dataset under root (once: an existing complete copy is reused).

    Written into a temporary sibling folder and renamed into place, so an interrupted
    generation never leaves a half-written dataset that looks complete.
    """
    root = Path(root)
    if is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    # mkdtemp makes the folder private (0700): a cache shared by a group must follow the umask.
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    try:
        rows = []
        for split, count in (("train", num_train), ("val", num_val)):
            ade = SPLITS[split]
            for d in (
                tmp / split,
                tmp / "ADEChallengeData2016" / "images" / ade,
                tmp / "ADEChallengeData2016" / "annotations" / ade,
            ):
                d.mkdir(parents=True, exist_ok=True)
            for name in SHAPES:
                (tmp / split / name).mkdir(exist_ok=True)
            for i in range(count):
                image, labels, shape, colour = render(seed, split, i, image_size)
                stem = f"{split}_{i:06d}"
                rel = f"{split}/{SHAPES[shape]}/{stem}.png"
                image.save(tmp / rel)
                image.save(tmp / "ADEChallengeData2016" / "images" / ade / f"{stem}.jpg", quality=95)
                labels.save(tmp / "ADEChallengeData2016" / "annotations" / ade / f"{stem}.png")
                rows.append((split, rel, SHAPES[shape], list(COLOURS)[colour]))
        with open(tmp / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["split", "file", "shape", "colour"])
            writer.writerows(rows)
        meta = dict(
            generator_version=GENERATOR_VERSION,
            num_train=num_train,
            num_val=num_val,
            image_size=image_size,
            seed=seed,
            shapes=list(SHAPES),
            colours=list(COLOURS),
            segmentation_classes=["background", *COLOURS],
            ignore_index=0,
        )
        (tmp / DONE_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished the same dataset first: keep theirs.
            if not is_complete(root):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
