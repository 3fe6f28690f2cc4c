"""The method a run is checked against before compute, and what its checkpoint holds.

`planned_method` builds it on the meta device (geometry, capabilities and sizes, no weights), so
planning a run, or every cell of a sweep, costs neither the weights' memory nor their
initialisation; `load_checkpoint_method` reads a checkpoint (ours or an official release) and
checks it against the config, memory-mapped by names and shapes while planning. The runner
builds or loads the real method when it executes (`benchmark.runner.materialize`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from benchmark import official
from benchmark.core import checkpoint as ckpt
from benchmark.core.errors import CheckpointError, ConfigError, DataError
from methods import build_method, method_from_state
from methods.base import Method

# The model settings a checkpoint of ours must share with the config that evaluates it.
ARCHITECTURE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def load_checkpoint_method(cfg: DictConfig, path: Path, planning: bool = False) -> Method:
    """The method a checkpoint holds (ours or an official release), checked against the config;
    `planning`: read memory-mapped, by names and shapes (see `planned_method`)."""
    state = ckpt.load(path, mmap=planning)
    if official.layout_of(state) != "bench":
        return official.method_from_official(state, path, cfg)
    method_state = state["method"]
    if method_state["method"] != cfg.method.name:
        raise CheckpointError(f"{path} holds method {method_state['method']!r} but method={cfg.method.name}")
    differ = [
        f"{k}={method_state['model_cfg'].get(k)} (config {cfg.model.get(k)})"
        for k in ARCHITECTURE_KEYS
        if method_state["model_cfg"].get(k) != cfg.model.get(k)
    ]
    if method_state["image_size"] != cfg.data.image_size:
        differ.append(f"image_size={method_state['image_size']} (config data.image_size={cfg.data.image_size})")
    if differ:
        raise CheckpointError(f"{path} does not match model={cfg.choices.model}: {', '.join(differ)}")
    return method_from_state(method_state)


def planned_method(cfg: DictConfig, config: dict, checkpoint_path: Path | None) -> Method:
    """The method as `execute` will build it, on the meta device: its geometry, capabilities and
    sizes without weights, initialisation or memory. A checkpoint is read memory-mapped and
    checked by names and shapes; its bytes stay on disk (a sweep over multi-GB checkpoints plans
    on a login node). The global RNG is left as it was."""
    with building(cfg), torch.random.fork_rng(devices=[]), torch.device("meta"):
        if checkpoint_path is not None:
            return load_checkpoint_method(cfg, checkpoint_path, planning=True)
        return build_method(cfg.method.name, config["model"], config["method"], cfg.data.image_size)


@contextmanager
def building(cfg: DictConfig):
    """A method that cannot be built from these settings is a config error (exit 2)."""
    try:
        yield
    except (ValueError, KeyError) as exc:
        if isinstance(exc, (CheckpointError, DataError)):
            raise
        raise ConfigError(f"cannot build method {cfg.method.name}: {exc}") from None


def is_planned(method: Method) -> bool:
    """Whether a method is a planning build (meta device, no weights)."""
    return any(p.is_meta for p in method.parameters())


def checkpoint_bytes(method: Method) -> int:
    """About the size of a pretraining checkpoint: the weights (target encoder included) and
    AdamW's two moments of every trained one, plus 1 MiB for the rest."""
    weights = sum(t.numel() * t.element_size() for t in method.state_dict().values())
    trained = sum(p.numel() * 4 for p in method.parameters() if p.requires_grad)
    return weights + 2 * trained + 2**20
