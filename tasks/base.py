"""The contract of an evaluation task, and what a run hands every task.

A task is built from its config section (checked there: a bad setting fails before compute) and
run on a pretrained method (trained in this run or loaded from a checkpoint); it returns a
flat-ish dict of metrics that goes into the run record, with its `headline` metric among them.
`applies_to` says whether the method has what the task needs, and if not why: a task named on
the command line that does not apply is an error before compute, `task=all` skips it and says
why. Tasks talk to the method only through the contract in `methods.base`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from benchmark.core.data import DataSource
from benchmark.core.errors import ConfigError
from benchmark.core.layers import to_device, use_attention
from benchmark.core.loading import Transformed, eval_loader, make_loader, stack_views
from benchmark.core.progress import progress_bar
from benchmark.core.stats import fingerprint
from benchmark.core.transforms import eval_transform
from methods.base import Method


@dataclass
class TaskContext:
    source: DataSource
    device: torch.device
    encoder_key: str
    seed: int
    run_dir: Path
    workers: int = 0
    show_progress: bool = True
    batch_size: int = 128
    # Frozen patch tokens of a split are kept in memory up to this size (float32), else streamed.
    token_cache_bytes: int = 4 * 2**30
    # The run's `attention` setting: frozen tokens and features are extracted in float32 with the
    # kernel it picks for float32, whichever task asks for them first.
    attention: str = "auto"
    _features: dict = field(default_factory=dict)
    _tokens: dict = field(default_factory=dict)

    def labels(self, split: str, column: str | None = None) -> tuple[torch.Tensor, int]:
        """(label of every sample of the split in loader order, number of classes) for a label column.

        Every label column lists the same files, so sample i is the same image in all of them and
        one token cache serves every label set.
        """
        source = self.source if column is None else replace(self.source, label_column=column)
        dataset = source.split(split)
        return torch.tensor([label for _, label in dataset.samples]), len(dataset.classes)

    def val_fingerprint(self, column: str | None = None) -> str:
        """Names the val examples (files, labels, order) a classification task scores."""
        source = self.source if column is None else replace(self.source, label_column=column)
        dataset = source.split("val")
        return fingerprint(source.name, [(str(p.relative_to(dataset.root)), y) for p, y in dataset.samples])

    def frozen_tokens(self, method: Method, split: str) -> torch.Tensor | None:
        """Last-layer patch tokens [n, N, D] of the frozen eval encoder over a split, extracted once.

        None when the split's tokens would not fit in `token_cache_bytes`: callers then stream
        images through the encoder (`token_batches` does either).
        """
        key = (id(method), self.encoder_key, split)
        if key not in self._tokens:
            encoder = method.eval_encoder(self.encoder_key)
            dataset = self.source.split(split)
            size = self.source.image_size
            per_image = (size // method.patch_size) ** 2 * method.token_dim
            if len(dataset) * per_image * 4 > self.token_cache_bytes:
                self._tokens[key] = None
            else:
                loader = eval_loader(dataset, size, self.batch_size, self.workers)
                self._tokens[key] = torch.cat(list(self._encode(encoder, loader, f"tokens {split}")))
        return self._tokens[key]

    def token_batches(
        self, method: Method, split: str, order: torch.Tensor, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(frozen tokens on self.device, sample indices) for consecutive chunks of `order`.

        From the cache when the split fits in it, else the same deterministic eval views encoded
        on the fly, so both paths give the same tokens.
        """
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        cached = self.frozen_tokens(method, split)
        if cached is not None:
            for idx in chunks:
                yield cached[idx].to(self.device), idx
            return
        dataset = Transformed(self.source.split(split), eval_transform(self.source.image_size))
        loader = make_loader(dataset, [[(int(i), 0, 0) for i in idx] for idx in chunks], stack_views, self.workers)
        encoder = method.eval_encoder(self.encoder_key)
        for idx, tokens in zip(chunks, self._encode(encoder, loader, None)):
            yield tokens.to(self.device), idx

    def _encode(self, encoder, loader, description: str | None) -> Iterator[torch.Tensor]:
        was_training = encoder.training
        encoder.to(self.device).eval()
        with progress_bar(
            description or "", len(loader), enabled=self.show_progress and description is not None
        ) as bar:
            for batch in loader:
                # Not around the yield: grad mode is global, the consumer may be training.
                with torch.no_grad():
                    tokens = self._extract(encoder, batch["images"])
                yield tokens
                bar.advance()
        encoder.train(was_training)

    def _extract(self, encoder: nn.Module, images: torch.Tensor, features=None) -> torch.Tensor:
        """Float32 tokens of one batch (or `features(images)`, another output of the same encoder),
        with the float32 attention kernel of the run's setting."""
        restore = use_attention(encoder, self.attention, self.device, bf16=False)
        try:
            return (features or encoder)(to_device(images, self.device)).float().cpu()
        finally:
            restore()

    def pooled_features(self, method: Method, split: str, pool: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """One feature per image of a split from the frozen eval encoder, computed once: the
        last-layer patch tokens' mean, or another of the method's `probe_pools` (a cls token).

        Every frozen-feature probe of a run shares this extraction (the mean also the token cache's).
        """
        key = (id(method), self.encoder_key, split, pool)
        tokens = self.frozen_tokens(method, split) if pool == "mean" else None
        if tokens is not None and key not in self._features:
            self._features[key] = (tokens.mean(dim=1), self.labels(split)[0])
        if key not in self._features:
            encoder = method.eval_encoder(self.encoder_key).to(self.device).eval()
            loader = eval_loader(self.source.split(split), self.source.image_size, self.batch_size, self.workers)
            feats, labels = [], []
            with torch.no_grad(), progress_bar(f"features {split}", len(loader), enabled=self.show_progress) as bar:
                for batch in loader:
                    batch = to_device(batch, self.device)
                    if pool == "mean":
                        feats.append(self._extract(encoder, batch["images"]).mean(dim=1))
                    else:
                        feats.append(
                            self._extract(
                                encoder, batch["images"], lambda x: method.probe_features(x, self.encoder_key, pool)
                            )
                        )
                    labels.append(batch["labels"].cpu())
                    bar.advance()
            self._features[key] = (torch.cat(feats), torch.cat(labels))
        return self._features[key]


# A frozen-feature probe's feature: the patch tokens' mean, the cls token, or what the method's
# own paper reads (`Method.probe_pool`).
POOLS = ("mean", "cls", "method")


@dataclass(frozen=True)
class Number:
    """A numeric setting: type and range (open or closed ends), optionally null."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    def problem(self, value) -> str | None:
        if value is None and self.nullable:
            return None
        kind = "an integer" if self.integer else "a number"
        numeric = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        bad = isinstance(value, bool) or not numeric
        if not bad:
            bad = (self.low is not None and (value <= self.low if self.low_open else value < self.low)) or (
                self.high is not None and (value >= self.high if self.high_open else value > self.high)
            )
        if not bad:
            return None
        null = " or null" if self.nullable else ""
        if self.low is not None and self.high is not None:
            span = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
            return f"must be {'an integer ' if self.integer else ''}in {span}{null}"
        if self.low is not None:
            return f"must be {kind} {'>' if self.low_open else '>='} {self.low}{null}"
        return f"must be {kind}{null}"


@dataclass(frozen=True)
class Numbers:
    """A non-empty list of numbers, each checked by `each`."""

    each: Number

    def problem(self, value) -> str | None:
        if not isinstance(value, (list, tuple)) or not value or any(self.each.problem(v) for v in value):
            return f"must be a non-empty list of numbers, each {self.each.problem(None) or 'a number'}"
        return None


@dataclass(frozen=True)
class Choice:
    options: tuple

    def problem(self, value) -> str | None:
        return None if value in self.options else f"must be one of {', '.join(map(str, self.options))}"


@dataclass(frozen=True)
class Flag:
    def problem(self, value) -> str | None:
        return None if isinstance(value, bool) else "must be true or false"


def check_settings(name: str, cfg: dict, settings: dict) -> None:
    """Every declared setting of a task section, by type and range; ConfigError names the key."""
    for key, spec in settings.items():
        if key not in cfg:
            raise ConfigError(f"tasks.{name}.{key} is missing")
        why = spec.problem(cfg[key])
        if why:
            raise ConfigError(f"tasks.{name}.{key} {why}, got {cfg[key]!r}")


@dataclass(frozen=True)
class Applies:
    """Whether a task applies to a method, and if not, why (one line)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    @classmethod
    def needs(cls, method: Method, **capabilities: bool) -> Applies:
        """Applies when the method has every capability asked for (see methods.base.Capabilities)."""
        missing = method.capabilities.missing(**capabilities)
        return cls(True) if missing is None else cls(False, f"method {method.name}: {missing}")


class Task(ABC):
    name: ClassVar[str]
    # The metric a task is ranked by: the console table, task=all and the leaderboard read it.
    headline: ClassVar[str] = "top1"
    # Every setting of the task's config section: checked when the task is built, before compute.
    settings: ClassVar[dict] = {}

    def __init__(self, cfg: dict):
        # Plain containers: list-valued settings arrive as OmegaConf lists from the runner.
        self.cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        check_settings(self.name, self.cfg, self.settings)

    @property
    def data_parallel(self) -> bool:
        """Whether every rank of a data-parallel job runs this task together (each on its share
        of every batch; rank 0 evaluates and records). Otherwise rank 0 runs it alone."""
        return False

    def applies_to(self, method: Method) -> Applies:
        """Whether the method has what this task needs (capabilities), with the reason if not."""
        return Applies(True)

    def check(self, method: Method) -> None:
        """Settings that cannot work with this method (ConfigError); called before compute."""

    def check_data(self, source, sizes: dict[str, int]) -> None:
        """Settings that cannot work with this data, and the task's own files (ConfigError,
        DataError); called before compute. The built-in data may not be generated yet: `sizes`
        holds the image count of each split ('train', 'val') either way."""

    @abstractmethod
    def run(self, method: Method, ctx: TaskContext) -> dict:
        """Evaluate the method; returns metrics."""
