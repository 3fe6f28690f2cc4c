"""Datasets on disk: image folders, labels files, the built-in data, label maps.

How they are loaded (seeded batches, workers) is benchmark/core/loading.py; the image
transforms are benchmark/core/transforms.py.

Unreadable files are found in two places, because decoding every image of ImageNet before
training would take longer than many runs: when a split is first used, every file's header is
read (format, size, mode: no pixel decoding, in a thread pool) and a file PIL cannot identify
fails the run before training, naming the file; a file whose header is fine but whose pixels
are not (a truncated download) fails when the loader decodes it, again naming the file. With
`skip_unreadable`, both kinds are skipped instead and listed in the run's unreadable.txt.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from benchmark.core import synthetic
from benchmark.core.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
# Modes that to_rgb turns into 8-bit RGB; anything else (LAB, HSV, multi-band TIFF) is refused.
READABLE_MODES = {
    "1",
    "L",
    "LA",
    "La",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "I",
    "I;16",
    "I;16B",
    "I;16L",
    "I;16N",
    "F",
}
# Header reads wait on storage (often a network file system), not on the CPU.
SCAN_THREADS = 8
# The run folder's list of skipped files, one path per line (a file may appear more than once).
UNREADABLE_LOG = "unreadable.txt"
# What PIL raises for a file it cannot identify or decode.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


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


def header_problem(path: Path) -> str | None:
    """Why PIL cannot use this file as an image, judged from its header alone; None if it can."""
    try:
        with Image.open(path) as img:
            (width, height), mode = img.size, img.mode
    except DECODE_ERRORS as exc:
        return _reason(exc)
    if width < 1 or height < 1:
        return f"empty image ({width}x{height})"
    if mode not in READABLE_MODES:
        return f"unsupported image mode {mode!r}"
    return None


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ImageFolder(Dataset):
    """`root/<class>/<image>` (ImageNet, iNat-style, any custom set); classes sorted by name.

    With `labels` (image path -> class name), images are still found in the class folders but
    labelled by that mapping instead: another label set over the same files. Headers are
    checked at construction (`check_headers`); unreadable files raise DataError naming the file,
    or are skipped with `skip_unreadable` (listed in `skipped`; see `log_skipped`).
    """

    def __init__(
        self,
        root: str | Path,
        labels: dict[Path, str] | None = None,
        skip_unreadable: bool = False,
        check_headers: bool = True,
        classes: list[str] | None = None,
        fix_hint: str = "data.skip_unreadable=true skips such files",
    ):
        self.root = Path(root)
        self.skip_unreadable = skip_unreadable
        self.fix_hint = fix_hint
        self.skip_log: Path | None = None
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"data folder has no class subfolders: {self.root}")
        found = [
            (path, name)
            for name in folders
            for path in sorted((self.root / name).rglob("*"))
            # Dotfiles (macOS `._*` resource forks included) are not images.
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
        ]
        if not found:
            raise DataError(f"data folder holds no images ({', '.join(IMAGE_EXTENSIONS)}): {self.root}")
        if labels is not None:
            unlabelled = [path for path, _ in found if path not in labels]
            if unlabelled:
                raise DataError(f"{len(unlabelled)} images have no label in the labels file, e.g. {unlabelled[0]}")
            found = [(path, labels[path]) for path, _ in found]
        self.skipped: list[Path] = []
        if check_headers:
            with ThreadPoolExecutor(SCAN_THREADS) as pool:
                problems = list(pool.map(header_problem, [path for path, _ in found]))
            bad = [(path, why) for (path, _), why in zip(found, problems) if why]
            if bad and not skip_unreadable:
                raise DataError(
                    f"unreadable image {bad[0][0]}: {bad[0][1]} ({len(bad)} unreadable under {self.root}; {fix_hint})"
                )
            self.skipped = [path for path, _ in bad]
            found = [item for item, why in zip(found, problems) if not why]
            if not found:
                raise DataError(f"data folder holds no readable images: {self.root}")
        self.present = sorted({name for _, name in found})
        # A val split is indexed by its train split's classes, so a class missing from one split
        # never shifts the labels of the others.
        self.classes = list(classes) if classes is not None else self.present
        unknown = sorted(set(self.present) - set(self.classes))
        if unknown:
            raise DataError(f"classes present only in {self.root}, not in the train split: {', '.join(unknown[:8])}")
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = [(path, index[name]) for path, name in found]

    def __len__(self) -> int:
        return len(self.samples)

    def log_skipped(self, path: Path) -> None:
        """Append skipped files to `path`, now (header failures) and as decoding meets them."""
        self.skip_log = Path(path)
        self._log(self.skipped)

    def _log(self, paths: list[Path]) -> None:
        if self.skip_log is not None and paths:
            # One short O_APPEND write per call: lines from several loader workers do not mix.
            with open(self.skip_log, "a") as f:
                f.write("".join(f"{p}\n" for p in paths))

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        # A file that fails to decode is replaced by the next readable one: deterministic, so
        # a resumed run still sees the batches the uninterrupted run saw.
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as img:
                    return to_rgb(img), label
            except DECODE_ERRORS as exc:
                if not self.skip_unreadable:
                    raise DataError(f"cannot decode image {path}: {_reason(exc)} ({self.fix_hint})") from None
                self._log([path])
        raise DataError(f"no image under {self.root} can be decoded")


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
    skip_unreadable: bool = False
    check_headers: bool = True
    # Generated by the harness (the built-in data): a damaged file means a damaged cache.
    generated: bool = False
    # Label column -> its full class list, where the data defines one (the built-in data): every
    # split is indexed by it, so a class a small split happens to lack is still a class.
    known_classes: dict[str, list[str]] = field(default_factory=dict)
    # Splits are scanned once (headers of every file) and shared by pretraining and the tasks.
    # Per label set: dataclasses.replace(source, label_column=...) starts a fresh cache.
    _splits: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def labels(self) -> dict[Path, str] | None:
        if self.label_file is None:
            return None
        with open(self.label_file, newline="") as f:
            reader = csv.DictReader(f)
            if "file" not in (reader.fieldnames or []) or self.label_column not in reader.fieldnames:
                raise DataError(f"labels file {self.label_file} needs columns 'file' and '{self.label_column}'")
            return {self.root / row["file"]: row[self.label_column] for row in reader}

    def split(self, which: str) -> ImageFolder:
        if which not in self._splits:
            folder = self.root / (self.train_split if which == "train" else self.val_split)
            classes = self.known_classes.get(self.label_column)
            if classes is None and which != "train":
                classes = self.split("train").classes
            hint = (
                f"the built-in data cache is damaged: delete {self.root} and run again to regenerate it"
                if self.generated
                else "data.skip_unreadable=true skips such files"
            )
            split = ImageFolder(folder, self.labels(), self.skip_unreadable, self.check_headers, classes, hint)
            missing = sorted(set(split.classes) - set(split.present))
            if missing and self.label_file is None:  # class folders: train and val name the same classes
                raise DataError(f"classes present only in the train split, not in {folder}: {', '.join(missing[:8])}")
            self._splits[which] = split
        return self._splits[which]


def resolve_data(cfg, cache_dir: str | Path, generate: bool = True) -> DataSource:
    """The DataSource of a `data` config; the built-in dataset is generated on first use.

    With generate=False only paths are checked (nothing written), for validation before a run.
    """
    if cfg.kind == "builtin":
        version = cfg.get("version", synthetic.GENERATOR_VERSION)
        if version not in synthetic.VERSIONS:
            raise DataError(
                f"data.version must be one of {', '.join(map(str, synthetic.VERSIONS))} (the generator's versions), "
                f"got {version!r}"
            )
        if cfg.label not in synthetic.label_sets(version):
            raise DataError(
                f"data.label must be one of {', '.join(synthetic.label_sets(version))} (data.version={version}), "
                f"got {cfg.label!r}"
            )
        name = synthetic.dataset_id(cfg.num_train, cfg.num_val, cfg.image_size, cfg.seed, version)
        root = Path(cache_dir).expanduser() / name
        if root.exists() and not os.access(root, os.R_OK | os.X_OK):
            raise DataError(
                f"data cache {root} cannot be read by this user (owner uid {root.stat().st_uid}, mode "
                f"{root.stat().st_mode & 0o777:o}): its owner can run `chmod -R a+rX {root}`, or set $BENCH_CACHE "
                "to a folder of your own"
            )
        if generate:
            synthetic.generate(root, cfg.num_train, cfg.num_val, cfg.image_size, cfg.seed, version)
        return DataSource(
            cfg.name,
            root,
            "train",
            "val",
            cfg.image_size,
            root / "labels.csv",
            cfg.label,
            cfg.skip_unreadable,
            cfg.check_headers,
            generated=True,
            known_classes={
                column: synthetic.label_classes(column, version) for column in synthetic.label_sets(version)
            },
        )
    if cfg.kind == "folder":
        if cfg.root is None:
            raise DataError(f"data={cfg.name} needs a folder: add data.root=/path/to/dataset")
        root = Path(str(cfg.root)).expanduser()
        for split in (cfg.train_split, cfg.val_split):
            if not (root / split).is_dir():
                raise DataError(f"data folder not found: {root / split} (data.root={cfg.root}, split '{split}')")
            if not os.access(root / split, os.R_OK | os.X_OK):
                raise DataError(f"data folder {root / split} cannot be read by this user (data.root={cfg.root})")
        label_file = None
        if cfg.labels_csv:
            label_file = root / str(cfg.labels_csv)
            if not label_file.is_file():
                raise DataError(f"labels file not found: {label_file}")
        return DataSource(
            cfg.name,
            root,
            cfg.train_split,
            cfg.val_split,
            cfg.image_size,
            label_file,
            cfg.label_column,
            cfg.skip_unreadable,
            cfg.check_headers,
        )
    raise DataError(f"unknown data kind {cfg.kind!r} (builtin or folder)")


def check_label_png(
    path: str | Path, num_classes: int, ignore_values: Sequence[int] = (0,), size: tuple[int, int] | None = None
) -> np.ndarray:
    """The class-index array of a segmentation label PNG, after checking it can be one.

    Valid values are 1..num_classes and `ignore_values` (ADE20k: 0 = ignore, 1..150 the
    classes, i.e. reduce_zero_label). `size` is the (width, height) of the image it labels.
    Raises DataError naming the file for an unreadable file, a colour (RGB) label, a size
    mismatch or values outside the range.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            mode, img_size = img.mode, img.size
            values = np.asarray(img)
    except DECODE_ERRORS as exc:
        raise DataError(f"unreadable label {path}: {_reason(exc)}") from None
    if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        raise DataError(f"label {path} has mode {mode}: a label must be one channel of class indices")
    if size is not None and tuple(img_size) != tuple(size):
        raise DataError(f"label {path} is {img_size[0]}x{img_size[1]} but its image is {size[0]}x{size[1]}")
    present = np.unique(values)
    allowed = (present >= 1) & (present <= num_classes) | np.isin(present, list(ignore_values))
    if not allowed.all():
        bad = present[~allowed]
        raise DataError(
            f"label {path} holds values {', '.join(map(str, bad[:5].tolist()))} outside 1..{num_classes} "
            f"(ignore: {', '.join(map(str, ignore_values))})"
        )
    return values
