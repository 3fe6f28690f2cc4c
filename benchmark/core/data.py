"""Datasets on disk and a deterministic loading pipeline.

Every random choice of the data path (sample order, crops, masks) is seeded from
(seed, epoch, batch index), never from worker-global state: a run gives the same batches with
any number of workers, and a resumed run continues with exactly the batches it would have seen.

Unreadable files are found in two places, because decoding every image of ImageNet before
training would take longer than many runs: when a split is first used, every file's header is
read (format, size, mode: no pixel decoding, in a thread pool) and a file PIL cannot identify
fails the run before training, naming the file; a file whose header is fine but whose pixels
are not (a truncated download) fails when the loader decodes it, again naming the file. With
`skip_unreadable`, both kinds are skipped instead and listed in the run's unreadable.txt.
"""

from __future__ import annotations

import atexit
import csv
import multiprocessing
import multiprocessing.queues
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from benchmark.core import synthetic
from benchmark.core.errors import DataError
from benchmark.core.seeding import derive_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
            classes = None if which == "train" else self.split("train").classes
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
        if cfg.label not in synthetic.LABELS:
            raise DataError(f"data.label must be one of {', '.join(synthetic.LABELS)}, got {cfg.label!r}")
        name = synthetic.dataset_id(cfg.num_train, cfg.num_val, cfg.image_size, cfg.seed)
        root = Path(cache_dir).expanduser() / name
        if root.exists() and not os.access(root, os.R_OK | os.X_OK):
            raise DataError(
                f"data cache {root} cannot be read by this user (owner uid {root.stat().st_uid}, mode "
                f"{root.stat().st_mode & 0o777:o}): its owner can run `chmod -R a+rX {root}`, or set $BENCH_CACHE "
                "to a folder of your own"
            )
        if generate:
            synthetic.generate(root, cfg.num_train, cfg.num_val, cfg.image_size, cfg.seed)
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


class SeededBatches(Sampler):
    """Batches of (index, sample_seed, batch_seed) for one epoch, starting at batch `start`.

    With `world_size` > 1 each rank gets its contiguous 1/world_size of every batch: the samples,
    and their seeds, are the ones a single process would see at those positions, so the union
    over ranks is the single-process batch; the batch seed (masks) is drawn per rank.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split over {world_size} processes")
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.start, self.shuffle, self.drop_last = start, shuffle, drop_last
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        full = self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)
        return max(0, full - self.start)

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        share = self.batch_size // self.world_size
        for b in range(self.start, self.start + len(self)):
            batch_seed = derive_seed(self.seed, self.epoch, b)
            shard_seed = batch_seed if self.world_size == 1 else derive_seed(batch_seed, self.rank)
            first = b * self.batch_size + self.rank * share
            chunk = order[first : min(first + share, (b + 1) * self.batch_size)]
            yield [(i, derive_seed(batch_seed, self.rank * share + j), shard_seed) for j, i in enumerate(chunk)]


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


def train_loader(
    dataset: Dataset,
    transform: Callable,
    collate: Callable,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """This rank's share of each of the epoch's batches (batch_size is the global batch)."""
    batches = SeededBatches(len(dataset), batch_size, seed, epoch, start, rank=rank, world_size=world_size)
    # Workers build views and masks while the step runs; pinned pages make the copy to a GPU async.
    return make_loader(Transformed(dataset, transform), batches, collate, workers, pin_memory)


# How much lower a loader worker's scheduling priority is than the training process's (nice
# increment): with no spare core, a worker at equal priority preempts the step's OpenMP threads,
# which then wait on each other at every barrier (measured in docs/performance.md).
WORKER_NICENESS = 10


# Set by the main process when it exits: from then on a worker obeys SIGTERM (see below).
_CLOSING = None


# Why a worker stopped, written by the worker, read by the training process (see _batch_not_sent).
_WORKER_FAILURE = None


def _closing_event():
    """The process-shared flags, made once in the main process before any worker is forked."""
    global _CLOSING, _WORKER_FAILURE
    if _CLOSING is None:
        _CLOSING = multiprocessing.get_context().Event()
        _WORKER_FAILURE = multiprocessing.get_context().Array("c", 512, lock=False)
        atexit.register(_CLOSING.set)  # runs before multiprocessing's own exit hook terminates workers
    return _CLOSING


_SCHEDULER_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}


def _on_sigterm(_signum, _frame) -> None:
    if _CLOSING is not None and _CLOSING.is_set():
        os._exit(0)


def init_loader_worker(_worker_id: int) -> None:
    """Every DataLoader worker: lower priority than the training process, and outlive SIGTERM
    and the SLURM preemption/timeout signals while the main process runs.

    SLURM signals every process of a job, loader workers included; a worker killed that way
    fails the main process's next batch before it can write its preemption checkpoint. The main
    process handles these signals (slurm/jobs.py). Once the main process exits (a finished run,
    or one stopped by an error while a worker was still busy) the worker obeys SIGTERM again, so
    the exit never waits on it; Ctrl-C (SIGINT) stops everything at any time.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    # Blocked since the fork (Loader.__iter__); one that arrived meanwhile is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SCHEDULER_SIGNALS)
    os.nice(WORKER_NICENESS)
    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(_batch_not_sent)


def _batch_not_sent(error: Exception, _obj) -> None:
    """A worker's queue could not send a built batch (its shared-memory copy hit the file size
    limit, `ulimit -f`, or /dev/shm is full). Python's queue would print the error and drop the
    batch, and the training process would wait for it forever; the worker leaves its reason for
    the training process and exits instead, so the loader fails at once (Loader names the cause)."""
    text = " ".join(str(error).split())
    if "File too large" in text:
        text += " (the file size limit, ulimit -f)"
    elif "No space left" in text:
        text += " (/dev/shm is full)"
    if _WORKER_FAILURE is not None:
        _WORKER_FAILURE.value = text.encode()[:511]
    print(f"loader worker: cannot hand a batch to the training process: {text}", file=sys.stderr, flush=True)
    os._exit(1)


class Loader(DataLoader):
    """A DataLoader whose failure when a worker stopped says why the worker stopped."""

    def __iter__(self):
        # Workers are forked here. Until a worker has run init_loader_worker it has torch's SIGTERM
        # handler, which dies on a signal from any process but its parent; a scheduler signalling
        # the whole job in that moment would fail the next batch. So the signals stay blocked
        # across the fork, and each worker unblocks them once its own handlers are in place.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SCHEDULER_SIGNALS)
        try:
            batches = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as exc:
                reason = _WORKER_FAILURE.value.decode() if _WORKER_FAILURE is not None else ""
                if not reason or "exited unexpectedly" not in str(exc):
                    raise
                raise DataError(
                    f"a data loader worker could not hand its batch to the training process: {reason}; "
                    f"fix that, or run with workers=0 (batches built in the training process)"
                ) from None
            yield batch


def make_loader(
    dataset: Dataset, batch_sampler, collate: Callable, workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """The one DataLoader construction every loop uses (workers set up by init_loader_worker)."""
    if workers:
        _closing_event()
    return Loader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=init_loader_worker if workers else None,
    )


def eval_loader(dataset: Dataset, image_size: int, batch_size: int, workers: int = 0) -> DataLoader:
    """Deterministic resize + centre crop, in order, every sample kept."""
    batches = SeededBatches(len(dataset), batch_size, 0, 0, shuffle=False, drop_last=False)
    return make_loader(Transformed(dataset, eval_transform(image_size)), batches, stack_views, workers)


def stack_views(items: Sequence) -> dict:
    views, labels, _ = zip(*items)
    return {"images": torch.stack(views), "labels": torch.tensor(labels)}


def normalize() -> T.Normalize:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(image_size: int) -> Callable:
    # Resize by the standard 224/256 ratio, then centre crop.
    return T.Compose(
        [
            T.Resize(int(round(image_size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            normalize(),
        ]
    )


def crop_transform(image_size: int, scale: Sequence[float], flip: bool = False) -> Callable:
    """RandomResizedCrop (+ optional horizontal flip) to a normalised tensor."""
    steps = [T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), normalize()])
