"""A tiny method, data and task context shared by the task-adapter tests (real code, seconds)."""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmark.config import load_config
from benchmark.core import synthetic
from benchmark.core.data import DataSource
from methods import build_method
from tasks.base import TaskContext

SIZE = 32
OVERRIDES = [
    "method=iwm",
    "task=all",
    "model.patch_size=8",
    "model.embed_dim=48",
    "model.num_heads=3",
    "model.depth=2",
    "method.predictor.depth=1",
    "method.predictor.width=24",
    "method.mask.min_keep=0",
    f"data.image_size={SIZE}",
]


def tiny_config() -> dict:
    cfg = OmegaConf.to_container(load_config(OVERRIDES), resolve=True)
    for task in cfg["tasks"].values():
        task.update(epochs=1, batch_size=8)
        if "warmup_epochs" in task:
            task["warmup_epochs"] = 0
    return cfg


def tiny_data(root: Path) -> DataSource:
    root = synthetic.generate(root, 32, 16, SIZE, seed=1)
    return DataSource("shapes", root, "train", "val", SIZE, root / "labels.csv", "colour")


def tiny_method(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    method = build_method("iwm", cfg["model"], cfg["method"], SIZE)
    with torch.no_grad():  # stand-in for pretraining: weights no initialisation reproduces
        for p in method.predictor.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return method.eval()


def context(source: DataSource, tmp: Path, **kw) -> TaskContext:
    return TaskContext(
        source=source,
        device=torch.device("cpu"),
        encoder_key="target_encoder",
        seed=0,
        run_dir=tmp,
        show_progress=False,
        **kw,
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
