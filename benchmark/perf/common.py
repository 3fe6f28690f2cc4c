"""What the suite and the official comparison share: the error, a config's method and data, its step."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf


class PerfError(ValueError):
    """A benchmark request that cannot run (unknown method, bad option)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _method_and_data(cfg, device: torch.device):
    from benchmark.core.data import resolve_data
    from methods import build_method

    dataset = resolve_data(cfg.data, cfg.cache_dir).split("train")
    torch.manual_seed(cfg.seed)
    method = build_method(
        cfg.method.name, OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.method), cfg.data.image_size
    )
    return method.to(device).train(), dataset


def training_step(cfg, method, dataset_size: int, device: torch.device):
    """The step the pretraining loop runs, as `train(step_index, batch) -> loss`, and its optimizer:
    the run's optimizer, attention kernel, lr / weight-decay schedule and EMA, nothing else."""
    from benchmark.core.layers import use_attention
    from benchmark.pretrain import Schedule, set_hyperparameters
    from benchmark.step import forward_loss, make_optimizer, step_function, update

    pcfg = cfg.pretrain
    opt = make_optimizer(method, pcfg)
    step_fn = step_function(method, bool(pcfg.compile))
    use_attention(method, pcfg.attention, device, bool(pcfg.bf16))
    schedule = Schedule.of(pcfg, dataset_size)

    def train(i: int, batch: dict) -> float:
        set_hyperparameters(opt, pcfg, schedule, i)
        loss = forward_loss(step_fn, batch, device, bool(pcfg.bf16))
        update(method, opt, loss, pcfg.clip_grad, i / schedule.total_steps)
        value = loss.item()
        _sync(device)
        return value

    return train, opt
