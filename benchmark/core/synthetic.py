"""The built-in dataset: procedurally drawn shapes, generated deterministically onto disk.

Version 4 (the default): every image shows one to four separated shapes of one shape class and
one of 12 colour classes (hues 30 degrees apart, each shape's hue within +-8 of its class centre;
varied saturation, brightness, sizes, positions and rotations) on a low-contrast textured
background. Three label sets describe it: `colour` (12 hue classes), `shape` (6 outlines) and
`count` (1-4; the sizes vary 2.5x in radius, so the covered area does not give the count away).
Segmentation classes are the colour classes.

Version 3 (`data.version=3`, the data before version 4): three to six small shapes of one of 8
classes and one of 6 colours (+-15 degrees), sometimes with a smaller odd shape; label sets
`shape` and `colour`; segmentation classes are the 6 colour classes. It stays reproducible image
for image.

The scene is drawn twice: as an RGB image and as a per-pixel label map, so the same generator
serves classification (ImageFolder layout by shape; `labels.csv` carries every label set) and
semantic segmentation (ADE20k layout). Image i of a split depends only on (version, seed, split, i).

Layout written under `root`:
    train/<shape>/<id>.png, val/<shape>/<id>.png         classification (ImageFolder)
    labels.csv                                            split, file, then one column per label set
    ADEChallengeData2016/images/{training,validation}/<id>.jpg
    ADEChallengeData2016/annotations/{training,validation}/<id>.png
                                                          0 = ignore, 1 = background, 2 + k = colour
                                                          class k (DONE.json lists the classes)
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
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 4
VERSIONS = (3, 4)
SHAPES_V3 = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
SHAPES_V4 = ("circle", "square", "triangle", "star", "cross", "ring")
# Colour classes are hue bins centred on these hues (degrees); a shape's hue is drawn within
# +-COLOUR_SPREAD of its class's centre.
COLOURS_V3 = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}
COLOURS_V4 = {
    "red": 0,
    "orange": 30,
    "yellow": 60,
    "lime": 90,
    "green": 120,
    "spring": 150,
    "cyan": 180,
    "azure": 210,
    "blue": 240,
    "violet": 270,
    "magenta": 300,
    "rose": 330,
}
COLOUR_SPREAD = {3: 15, 4: 8}
MAX_COUNT = 4
SPLITS = {"train": "training", "val": "validation"}
SUPERSAMPLE = 4
DONE_FILE = "DONE.json"


def shapes(version: int = GENERATOR_VERSION) -> tuple[str, ...]:
    return SHAPES_V4 if version == 4 else SHAPES_V3


def colours(version: int = GENERATOR_VERSION) -> tuple[str, ...]:
    return tuple(COLOURS_V4 if version == 4 else COLOURS_V3)


def label_sets(version: int = GENERATOR_VERSION) -> tuple[str, ...]:
    """The label sets of labels.csv: what a classification task on the built-in data can predict."""
    return ("shape", "colour", "count") if version == 4 else ("shape", "colour")


def label_classes(label_set: str, version: int = GENERATOR_VERSION) -> list[str]:
    """Every class of a label set, sorted (the order class folders would give)."""
    names = {"shape": shapes(version), "colour": colours(version), "count": [str(n) for n in range(1, MAX_COUNT + 1)]}
    return sorted(names[label_set])


def segmentation_classes(version: int = GENERATOR_VERSION) -> list[str]:
    return ["background", *colours(version)]


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


def _shape_colour(rng: np.random.Generator, colour: int, version: int) -> tuple[int, int, int]:
    centre = (COLOURS_V4 if version == 4 else COLOURS_V3)[colours(version)[colour]]
    hue = (centre + rng.uniform(-COLOUR_SPREAD[version], COLOUR_SPREAD[version])) % 360 / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _stamp(
    image: Image.Image, labels: Image.Image, kind: str, fills: list, cx: float, cy: float, r: float, angle: float
) -> None:
    """Draw one shape on the image and the label map with its fills, its hole cut back out."""
    below = (image.copy(), labels.copy())
    _draw_shape([ImageDraw.Draw(image), ImageDraw.Draw(labels)], fills, kind, cx, cy, r, angle)
    hole = _hole(kind, cx, cy, r, angle, image.size[0])
    if hole is not None:
        image.paste(below[0], mask=hole)
        labels.paste(below[1], mask=hole)


def _downsample(image: Image.Image, labels: Image.Image, size: int) -> tuple[Image.Image, Image.Image]:
    """The supersampled canvases at the output size: the image averaged, the labels sampled."""
    return image.resize((size, size), Image.BOX), labels.resize((size, size), Image.NEAREST)


def _render_v3(seed: int, split: str, index: int, size: int) -> tuple[Image.Image, Image.Image, dict[str, str]]:
    """Version 3: three to six small shapes of one class and colour, sometimes a smaller odd one;
    segmentation classes are the colour classes."""
    rng = np.random.default_rng([seed, list(SPLITS).index(split), index])
    big = size * SUPERSAMPLE
    image = Image.fromarray((_background(rng, big) * 255).astype(np.uint8))
    labels = Image.new("L", (big, big), 1)
    shape = int(rng.integers(len(SHAPES_V3)))
    colour = int(rng.integers(len(COLOURS_V3)))

    # A scattering of the class's shape (one colour class, varied shades and sizes), sometimes
    # with one small shape of another class among them.
    objects = [(shape, colour, rng.uniform(0.08, 0.16)) for _ in range(int(rng.integers(3, 7)))]
    if rng.random() < 0.3:
        other = int((shape + rng.integers(1, len(SHAPES_V3))) % len(SHAPES_V3))
        objects.insert(
            int(rng.integers(len(objects) + 1)), (other, int(rng.integers(len(COLOURS_V3))), rng.uniform(0.06, 0.1))
        )
    for kind_id, colour_id, radius in objects:
        kind = SHAPES_V3[kind_id]
        r = radius * big
        cx, cy = rng.uniform(r * 0.8, big - r * 0.8, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        _stamp(image, labels, kind, [_shape_colour(rng, colour_id, 3), 2 + colour_id], cx, cy, r, angle)
    image, labels = _downsample(image, labels, size)
    return image, labels, {"shape": SHAPES_V3[shape], "colour": colours(3)[colour]}


def _place(rng: np.random.Generator, radii: list[float], big: int) -> list[tuple[float, float]] | None:
    """Centres for discs of these radii inside the canvas with a gap between any two, or None."""
    centres: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(50):
            c = rng.uniform(r * 1.05, big - r * 1.05, size=2)
            if all(math.hypot(c[0] - x, c[1] - y) > r + q + 0.04 * big for (x, y), q in zip(centres, radii)):
                centres.append((float(c[0]), float(c[1])))
                break
        else:
            return None
    return centres


def _render_v4(seed: int, split: str, index: int, size: int) -> tuple[Image.Image, Image.Image, dict[str, str]]:
    """Version 4: one to four separated shapes of one class and colour class, of unrelated sizes."""
    rng = np.random.default_rng([seed, list(SPLITS).index(split), index, 4])
    big = size * SUPERSAMPLE
    image = Image.fromarray((_background(rng, big) * 255).astype(np.uint8))
    labels = Image.new("L", (big, big), 1)
    shape = int(rng.integers(len(SHAPES_V4)))
    colour = int(rng.integers(len(COLOURS_V4)))
    count = int(rng.integers(1, MAX_COUNT + 1))
    # Sizes vary 2.5x in radius (6x in area), so the covered area does not give the count away.
    while True:
        radii = sorted((rng.uniform(0.08, 0.2) * big for _ in range(count)), reverse=True)
        centres = _place(rng, radii, big)
        if centres is not None:
            break
    kind = SHAPES_V4[shape]
    for (cx, cy), r in zip(centres, radii):
        angle = rng.uniform(0, 2 * math.pi)
        _stamp(image, labels, kind, [_shape_colour(rng, colour, 4), 2 + colour], cx, cy, r, angle)
    image, labels = _downsample(image, labels, size)
    return image, labels, {"shape": kind, "colour": colours(4)[colour], "count": str(count)}


def render(
    seed: int, split: str, index: int, size: int, version: int = GENERATOR_VERSION
) -> tuple[Image.Image, Image.Image, dict[str, str]]:
    """One sample: (RGB image, label map, {label set: class name}), deterministic."""
    if version not in VERSIONS:
        raise ValueError(f"unknown generator version {version} (known: {', '.join(map(str, VERSIONS))})")
    return _render_v4(seed, split, index, size) if version == 4 else _render_v3(seed, split, index, size)


def dataset_id(num_train: int, num_val: int, image_size: int, seed: int, version: int = GENERATOR_VERSION) -> str:
    spec = json.dumps(dict(v=version, train=num_train, val=num_val, size=image_size, seed=seed), sort_keys=True)
    digest = hashlib.sha1(spec.encode()).hexdigest()[:8]
    return f"shapes-v{version}-{image_size}px-{num_train}-{num_val}-s{seed}-{digest}"


def is_complete(root: Path) -> bool:
    return (Path(root) / DONE_FILE).is_file()


def _write_sample(job: tuple) -> tuple[str, ...]:
    """Draw one sample into the folder being generated; returns its labels.csv row."""
    tmp, seed, split, i, image_size, version = job
    image, labels, classes = render(seed, split, i, image_size, version)
    ade, stem = SPLITS[split], f"{split}_{i:06d}"
    rel = f"{split}/{classes['shape']}/{stem}.png"
    image.save(tmp / rel)
    image.save(tmp / "ADEChallengeData2016" / "images" / ade / f"{stem}.jpg", quality=95)
    labels.save(tmp / "ADEChallengeData2016" / "annotations" / ade / f"{stem}.png")
    return (split, rel, *(classes[k] for k in label_sets(version)))


def generate(
    root: str | Path, num_train: int, num_val: int, image_size: int, seed: int, version: int = GENERATOR_VERSION
) -> Path:
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
        for split, ade in SPLITS.items():
            for d in (
                tmp / split,
                tmp / "ADEChallengeData2016" / "images" / ade,
                tmp / "ADEChallengeData2016" / "annotations" / ade,
            ):
                d.mkdir(parents=True, exist_ok=True)
            for name in shapes(version):
                (tmp / split / name).mkdir(exist_ok=True)
        # Images are independent: drawn by several processes, each writing its own files.
        jobs = [
            (tmp, seed, split, i, image_size, version)
            for split, n in (("train", num_train), ("val", num_val))
            for i in range(n)
        ]
        workers = min(len(os.sched_getaffinity(0)), 8, max(1, len(jobs) // 200))
        if workers > 1:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                rows = list(pool.map(_write_sample, jobs, chunksize=64))
        else:
            rows = [_write_sample(job) for job in jobs]
        with open(tmp / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["split", "file", *label_sets(version)])
            writer.writerows(rows)
        meta = dict(
            generator_version=version,
            num_train=num_train,
            num_val=num_val,
            image_size=image_size,
            seed=seed,
            label_sets=list(label_sets(version)),
            shapes=list(shapes(version)),
            colours=list(colours(version)),
            segmentation_classes=segmentation_classes(version),
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
