"""The contract of an evaluation task, and what a run hands every task.

A task is built from its config section and run on a pretrained method (trained in this run or
loaded from a checkpoint); it returns a flat-ish dict of metrics that goes into the run record.
Tasks talk to the method only through `methods.base.Method`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from benchmark.data import DataSource, eval_loader
from benchmark.pretrain import to_device
from benchmark.progress import progress_bar
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
    _features: dict = field(default_factory=dict)

    def pooled_features(self, method: Method, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Average-pooled last-layer tokens of the frozen eval encoder over a split, computed once.

        Every frozen-feature probe of a run shares this extraction.
        """
        key = (id(method), self.encoder_key, split)
        if key not in self._features:
            encoder = method.eval_encoder(self.encoder_key).to(self.device).eval()
            loader = eval_loader(self.source.split(split), self.source.image_size, self.batch_size, self.workers)
            feats, labels = [], []
            with torch.no_grad(), progress_bar(f"features {split}", len(loader), enabled=self.show_progress) as bar:
                for batch in loader:
                    batch = to_device(batch, self.device)
                    feats.append(encoder(batch["images"]).mean(dim=1).float().cpu())
                    labels.append(batch["labels"].cpu())
                    bar.advance()
            self._features[key] = (torch.cat(feats), torch.cat(labels))
        return self._features[key]


class Task(ABC):
    name: ClassVar[str]

    def __init__(self, cfg: dict):
        self.cfg = dict(cfg)

    def applies_to(self, method: Method) -> bool:
        return True

    @abstractmethod
    def run(self, method: Method, ctx: TaskContext) -> dict:
        """Evaluate the method; returns metrics."""
