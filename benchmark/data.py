"""Datasets on disk and a deterministic loading pipeline.

Every random choice of the data path (sample order, crops, masks) is seeded from
(seed, epoch, batch index), never from worker-global state: a run gives the same batches with
any number of workers, and a resumed run continues with exactly the batches it would have seen.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from benchmark import synthetic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset folder that cannot be used as configured."""


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16-bit and float images are rescaled, not clipped."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":  # no fixed range: stretch min..max
            a = a - a.min()
            peak = max(float(a.max()), 1e-12)
        else:  # integer: 16-bit range when values need it, else 8-bit
            peak = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


class ImageFolder(Dataset):
    """`root/<class>/<image>` (ImageNet, iNat-style, any custom set); classes sorted by name.

    With `labels` (image path -> class name), images are still found in the class folders but
    labelled by that mapping instead: another label set over the same files.
    """

    def __init__(self, root: str | Path, labels: dict[Path, str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"data folder has no class subfolders: {self.root}")
        found = [(path, name) for name in folders for path in sorted((self.root / name).rglob("*"))
                 if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]
        if not found:
            raise DataError(f"data folder holds no images ({', '.join(IMAGE_EXTENSIONS)}): {self.root}")
        if labels is not None:
            unlabelled = [path for path, _ in found if path not in labels]
            if unlabelled:
                raise DataError(f"{len(unlabelled)} images have no label in the labels file, e.g. {unlabelled[0]}")
            found = [(path, labels[path]) for path, _ in found]
        self.classes = sorted({name for _, name in found})
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = [(path, index[name]) for path, name in found]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            return to_rgb(img), label


@dataclass
class DataSource:
    """A configured dataset: where its splits live and at what resolution it is used."""
    name: str
    root: Path
    train_split: str
    val_split: str
    image_size: int
    # Optional CSV (columns: file relative to root, then label columns) and the column to use.
    label_file: Path | None = None
    label_column: str | None = None

    def labels(self) -> dict[Path, str] | None:
        if self.label_file is None:
            return None
        with open(self.label_file, newline="") as f:
            reader = csv.DictReader(f)
            if "file" not in (reader.fieldnames or []) or self.label_column not in reader.fieldnames:
                raise DataError(f"labels file {self.label_file} needs columns 'file' and '{self.label_column}'")
            return {self.root / row["file"]: row[self.label_column] for row in reader}

    def split(self, which: str) -> ImageFolder:
        return ImageFolder(self.root / (self.train_split if which == "train" else self.val_split), self.labels())


def resolve_data(cfg, cache_dir: str | Path, generate: bool = True) -> DataSource:
    """The DataSource of a `data` config; the built-in dataset is generated on first use.

    With generate=False only paths are checked (nothing written), for validation before a run.
    """
    if cfg.kind == "builtin":
        if cfg.label not in synthetic.LABELS:
            raise DataError(f"data.label must be one of {', '.join(synthetic.LABELS)}, got {cfg.label!r}")
        name = synthetic.dataset_id(cfg.num_train, cfg.num_val, cfg.image_size, cfg.seed)
        root = Path(cache_dir).expanduser() / name
        if generate:
            synthetic.generate(root, cfg.num_train, cfg.num_val, cfg.image_size, cfg.seed)
        return DataSource(cfg.name, root, "train", "val", cfg.image_size, root / "labels.csv", cfg.label)
    if cfg.kind == "folder":
        if cfg.root is None:
            raise DataError(f"data={cfg.name} needs a folder: add data.root=/path/to/dataset")
        root = Path(str(cfg.root)).expanduser()
        for split in (cfg.train_split, cfg.val_split):
            if not (root / split).is_dir():
                raise DataError(f"data folder not found: {root / split} (data.root={cfg.root}, split '{split}')")
        label_file = None
        if cfg.labels_csv:
            label_file = root / str(cfg.labels_csv)
            if not label_file.is_file():
                raise DataError(f"labels file not found: {label_file}")
        return DataSource(cfg.name, root, cfg.train_split, cfg.val_split, cfg.image_size, label_file, cfg.label_column)
    raise DataError(f"unknown data kind {cfg.kind!r} (builtin or folder)")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededBatches(Sampler):
    """Batches of (index, sample_seed, batch_seed) for one epoch, starting at batch `start`."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.start, self.shuffle, self.drop_last = start, shuffle, drop_last

    def __len__(self) -> int:
        full = self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)
        return max(0, full - self.start)

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        for b in range(self.start, self.start + len(self)):
            batch_seed = derive_seed(self.seed, self.epoch, b)
            chunk = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, derive_seed(batch_seed, j), batch_seed) for j, i in enumerate(chunk)]


class Transformed(Dataset):
    """Applies a random transform under a per-sample seed; items are (view, label, batch_seed)."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int, int]):
        index, sample_seed, batch_seed = key
        image, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            view = self.transform(image)
        return view, label, batch_seed


def train_loader(dataset: Dataset, transform: Callable, collate: Callable, batch_size: int, seed: int,
                 epoch: int, start: int = 0, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    batches = SeededBatches(len(dataset), batch_size, seed, epoch, start)
    # Workers build views and masks while the step runs; pinned pages make the copy to a GPU async.
    return DataLoader(Transformed(dataset, transform), batch_sampler=batches, collate_fn=collate,
                      num_workers=workers, persistent_workers=False, pin_memory=pin_memory)


def eval_loader(dataset: Dataset, image_size: int, batch_size: int, workers: int = 0) -> DataLoader:
    """Deterministic resize + centre crop, in order, every sample kept."""
    batches = SeededBatches(len(dataset), batch_size, 0, 0, shuffle=False, drop_last=False)
    return DataLoader(Transformed(dataset, eval_transform(image_size)), batch_sampler=batches,
                      collate_fn=stack_views, num_workers=workers)


def stack_views(items: Sequence) -> dict:
    views, labels, _ = zip(*items)
    return {"images": torch.stack(views), "labels": torch.tensor(labels)}


def normalize() -> T.Normalize:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(image_size: int) -> Callable:
    # Resize by the standard 224/256 ratio, then centre crop.
    return T.Compose([T.Resize(int(round(image_size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.ToTensor(), normalize()])


def crop_transform(image_size: int, scale: Sequence[float], flip: bool = False) -> Callable:
    """RandomResizedCrop (+ optional horizontal flip) to a normalised tensor."""
    steps = [T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), normalize()])
