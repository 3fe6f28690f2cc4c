"""The ADE20k reader, the mmseg training pipeline and sliding-window inference.

Folder layout (ADE20k's own, also written by the built-in generator):
    ADEChallengeData2016/images/{training,validation}/<name>.jpg
    ADEChallengeData2016/annotations/{training,validation}/<name>.png
Label 0 means "other/ignore"; reduce_zero_label maps it to 255 (ignored) and shifts every other
class down by one, so ADE20k's 150 classes become 0..149 (the built-in data's 7 become 0..6).
The training pipeline is the one of mmseg's ADE20k configs: random rescale by a ratio in
[0.5, 2.0] of the base scale, random crop (redrawn while one class covers more than
cat_max_ratio of it), horizontal flip, photometric distortion, padding to the crop size.
Images are resampled as mmcv's cv2 backend does (bilinear without antialiasing, 8-bit results);
label maps by PIL's nearest neighbour (pixel centres).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from benchmark.core.data import check_label_png, to_rgb
from benchmark.core.errors import DataError
from benchmark.core.transforms import IMAGENET_MEAN, IMAGENET_STD
from tasks.segmentation.metrics import IGNORE_INDEX

ADE_DIR = "ADEChallengeData2016"
SPLITS = {"train": "training", "val": "validation"}


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 -> ignore (255), k -> k - 1."""
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    return out


class ADE20k(Dataset):
    """Image and label-map pairs of one split; labels reduced to 0..C-1 with 255 = ignore."""

    def __init__(self, root: str | Path, split: str, reduce_zero: bool = True):
        base = Path(root) / ADE_DIR if (Path(root) / ADE_DIR).is_dir() else Path(root)
        images, labels = base / "images" / SPLITS[split], base / "annotations" / SPLITS[split]
        for folder in (images, labels):
            if not folder.is_dir():
                raise DataError(
                    f"segmentation folder not found: {folder} (expected {ADE_DIR}/images|annotations/"
                    f"training|validation under {root})"
                )
        label_files = {p.stem: p for p in labels.glob("*.png")}
        self.samples = [
            (p, label_files.get(p.stem))
            for p in sorted(images.iterdir())
            if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        ]
        if not self.samples:
            raise DataError(f"no images in {images}")
        unlabelled = [p.name for p, lab in self.samples if lab is None]
        if unlabelled:
            raise DataError(
                f"{len(unlabelled)} images in {images} have no annotation png in {labels}, e.g. {unlabelled[0]}"
            )
        self.root, self.reduce_zero = Path(root), reduce_zero

    def check_labels(self, num_classes: int) -> None:
        """Every annotation's mode, size and raw values, before any training (in parallel, like the
        image header scan); DataError names the file and the raw value.

        Raw values: 1..num_classes and 0 (ignore) with reduce_zero_label, else 0..num_classes - 1
        and 255 (ignore)."""

        def one(pair: tuple[Path, Path]) -> None:
            image_path, label_path = pair
            with Image.open(image_path) as img:
                size = img.size
            if self.reduce_zero:
                check_label_png(label_path, num_classes, ignore_values=(0,), size=size)
            else:  # classes 0..C-1: shift the allowed range of the check by one
                values = check_label_png(label_path, num_classes + 1, ignore_values=(0, IGNORE_INDEX), size=size)
                if values.size and int(values[values != IGNORE_INDEX].max(initial=0)) >= num_classes:
                    raise DataError(f"label {label_path} holds values >= {num_classes} (classes 0..{num_classes - 1})")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, self.samples))

    def class_names(self, num_classes: int) -> list[str]:
        """Names of the classes 0..C-1 as the task numbers them: from the built-in data's DONE.json
        (`segmentation_classes`, raw labels 1..) or ADE20k's objectInfo150 table (raw labels 1..150),
        else 'class k'."""
        raw = None  # names of raw labels 1, 2, ...
        done = self.root / "DONE.json"
        if done.is_file():
            try:
                raw = json.loads(done.read_text()).get("segmentation_classes")
            except (OSError, ValueError):
                raw = None
        for table in (self.root / ADE_DIR / "objectInfo150.txt", self.root / "objectInfo150.txt"):
            if raw is None and table.is_file():
                lines = table.read_text(errors="replace").splitlines()[1:]
                raw = [line.split("\t")[-1].replace(";", ",").split(",")[0].strip() for line in lines if line.strip()]
        names = []
        for k in range(num_classes):
            index = k if self.reduce_zero else k - 1  # raw label k + 1, or k
            names.append(raw[index] if raw and 0 <= index < len(raw) else f"class {k}")
        return names

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, label_path = self.samples[index]
        with Image.open(image_path) as img:
            image = to_rgb(img)
        with Image.open(label_path) as lab:
            label = np.array(lab)
        if label.ndim != 2 or label.shape != (image.height, image.width):
            raise DataError(f"annotation {label_path} has shape {label.shape}, image is {image.height}x{image.width}")
        label = reduce_zero_label(label) if self.reduce_zero else label.astype(np.int64)
        return image, label


@dataclass
class Pipeline:
    """Sizes of the mmseg pipeline: scale (long, short) is the base rescale target (2048, 512)."""

    scale: tuple[int, int]
    crop: int
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip: float = 0.5
    photometric: bool = True


def rescale_size(h: int, w: int, scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size fitting (long, short) * ratio.

    RandomResize truncates the scaled target to integers before fitting the image to it."""
    long_side, short_side = int(max(scale) * ratio), int(min(scale) * ratio)
    factor = min(long_side / max(h, w), short_side / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(image: Image.Image, h: int, w: int) -> np.ndarray:
    """RGB image -> float HWC array [h, w, 3] of integers in 0..255, resampled as cv2's
    INTER_LINEAR (what mmcv's Resize uses): no antialiasing when shrinking, rounded to 8 bits."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(pixels, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.float64)


# mmseg's PhotoMetricDistortion defaults; hue in OpenCV's 8-bit unit (2 degrees, 180 a turn).
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # float32 arithmetic, clipped, truncated back to 8 bits: each step sees the previous one's
    # saturated pixels, as in mmseg.
    return np.floor(np.clip(img.astype(np.float32) * alpha + beta, 0, 255)).astype(np.float64)


def photometric_distortion(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an HWC array of 8-bit values, in its order of steps and
    draws: brightness, contrast (first or last, a coin decides), saturation, hue, each with p 0.5.

    Saturation and hue are separate passes through HSV (float here, 8-bit in OpenCV), each
    rounded back to 8 bits; the hue shift is a whole number of OpenCV hue units in [-18, 18)."""

    def coin() -> bool:
        return rng.random() < 0.5

    def contrast(img: np.ndarray) -> np.ndarray:
        return _convert(img, alpha=rng.uniform(*CONTRAST_RANGE)) if coin() else img

    if coin():
        img = _convert(img, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = coin()
    if contrast_first:
        img = contrast(img)
    if coin():
        h, s, v = _rgb_to_hsv(img / 255.0)
        s = np.clip(s * rng.uniform(*SATURATION_RANGE), 0, 1)
        img = np.round(_hsv_to_rgb(h, s, v) * 255.0)
    if coin():
        h, s, v = _rgb_to_hsv(img / 255.0)
        h = (h + rng.randrange(-HUE_DELTA, HUE_DELTA) / 180.0) % 1.0
        img = np.round(_hsv_to_rgb(h, s, v) * 255.0)
    if not contrast_first:
        img = contrast(img)
    return img


def _rgb_to_hsv(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mx, mn = a.max(-1), a.min(-1)
    d = mx - mn
    safe = np.where(d > 0, d, 1)
    h = np.where(mx == r, (g - b) / safe % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = np.where(d > 0, h, 0)
    s = np.where(mx > 0, d / np.where(mx > 0, mx, 1), 0)
    return h, s, mx


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(h.shape + (3,))
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        out[sel] = np.stack([r[sel], g[sel], b[sel]], -1)
    return out


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC 0..255 -> normalised CHW float (ImageNet statistics, as mmseg's data preprocessor)."""
    mean = np.array(IMAGENET_MEAN) * 255.0
    std = np.array(IMAGENET_STD) * 255.0
    return torch.from_numpy(((img - mean) / std).transpose(2, 0, 1).copy()).float()


def train_sample(
    image: Image.Image, label: np.ndarray, p: Pipeline, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented crop: image [3, crop, crop] normalised, label [crop, crop] (255 = ignore)."""
    h, w = rescale_size(image.height, image.width, p.scale, rng.uniform(*p.ratio_range))
    img = resize_image(image, h, w)
    lab = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((w, h), Image.NEAREST), dtype=np.int64)
    ch, cw = min(p.crop, h), min(p.crop, w)

    def draw() -> tuple[int, int]:
        return rng.randint(0, h - ch), rng.randint(0, w - cw)

    y, x = draw()
    # mmseg checks up to 10 crops and draws an 11th, unchecked, when all of them fail.
    for _ in range(10 if p.cat_max_ratio < 1 else 0):
        window = lab[y : y + ch, x : x + cw]
        _, counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < p.cat_max_ratio:
            break
        y, x = draw()
    img, lab = img[y : y + ch, x : x + cw], lab[y : y + ch, x : x + cw]
    if rng.random() < p.flip:
        img, lab = img[:, ::-1], lab[:, ::-1]
    if p.photometric:
        img = photometric_distortion(img, rng)
    # Padded after normalising (value 0), as mmseg's data preprocessor does; padding is ignored.
    tensor = F.pad(to_tensor(img), (0, p.crop - cw, 0, p.crop - ch))
    padded_lab = np.full((p.crop, p.crop), IGNORE_INDEX, dtype=np.int64)
    padded_lab[:ch, :cw] = lab
    return tensor, torch.from_numpy(padded_lab)


def eval_image(image: Image.Image, scale: tuple[int, int]) -> torch.Tensor:
    """The test-time rescale (keep ratio to `scale`), normalised [3, H', W']."""
    h, w = rescale_size(image.height, image.width, scale)
    return to_tensor(resize_image(image, h, w))


class TrainCrops(Dataset):
    """Keys (index, sample_seed, batch_seed) -> (image, label); each sample's randomness from its seed."""

    def __init__(self, base: ADE20k, pipeline: Pipeline):
        self.base, self.pipeline = base, pipeline

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int, int]):
        index, sample_seed, _ = key
        image, label = self.base[index]
        return train_sample(image, label, self.pipeline, random.Random(sample_seed))


def stack_pairs(items) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*items)
    return torch.stack(images), torch.stack(labels)


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg's sliding grid along one axis: last window flush with the border."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(n)})


def slide_inference(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, num_classes: int, crop: int, stride: int
) -> torch.Tensor:
    """Logits [B, C, H, W] averaged over crop x crop windows every `stride` pixels.

    Windows smaller than the crop (images smaller than it) are zero-padded to the crop size and
    their logits cut back, so the model always sees its training input size.
    """
    b, _, h, w = image.shape
    total = image.new_zeros(b, num_classes, h, w)
    count = image.new_zeros(1, 1, h, w)
    for y in window_starts(h, crop, stride):
        for x in window_starts(w, crop, stride):
            window = image[:, :, y : y + crop, x : x + crop]
            wh, ww = window.shape[-2:]
            window = F.pad(window, (0, crop - ww, 0, crop - wh))
            total[:, :, y : y + wh, x : x + ww] += logits_fn(window)[:, :, :wh, :ww].float()
            count[:, :, y : y + wh, x : x + ww] += 1
    return total / count
