"""Officially released checkpoints: which layout a file is in, and loading it into the configured method.

Each method's file (methods/*.py) reads and writes its own release layout; this module only
dispatches. Reading is weights-only (benchmark.core.checkpoint.load) and strict: the architecture
read off the tensors is compared with the config first, then every tensor must match a
parameter by name and shape. Position tables are resampled bicubically when the file was
trained at another resolution, as MAE's and timm's loaders do.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from benchmark.core.errors import CheckpointError
from methods import METHODS, build_method, method_from_state
from methods.base import Method


def layout_of(state) -> str:
    """'bench' (written by bench run) or the official layout a registered method reads."""
    if isinstance(state, dict):
        if isinstance(state.get("method"), dict) and "weights" in state["method"]:
            return "bench"
        for cls in METHODS.values():
            if cls.official_layout and cls.official_matches(state):
                return cls.official_layout
    keys = ", ".join(map(str, list(state)[:6])) if isinstance(state, dict) else type(state).__name__
    known = ", ".join(dict.fromkeys(cls.official_about for cls in METHODS.values() if cls.official_layout))
    raise CheckpointError(
        f"unknown checkpoint layout (top level: {keys}): expected one written by bench run, or {known}"
    )


def readers_of(layout: str) -> list[type[Method]]:
    """The registered methods that read a layout, the method that defines it first."""
    readers = [cls for cls in METHODS.values() if cls.official_layout == layout]
    return sorted(readers, key=lambda cls: cls.name != layout)


def method_from_official(state: dict, path: Path, cfg: DictConfig) -> Method:
    """A method holding the weights of an official file, checked against cfg."""
    layout = layout_of(state)
    if layout == "bench":
        raise CheckpointError(f"{path} is a bench checkpoint, not an official release")
    cls = METHODS[cfg.method.name]
    if cls.official_layout != layout:
        readers = readers_of(layout)
        others = f" (or {', '.join(r.name for r in readers[1:])})" if len(readers) > 1 else ""
        raise CheckpointError(
            f"{path} is {readers[0].official_about}: use method={readers[0].name}{others}, not method={cfg.method.name}"
        )
    found = cls.official_architecture(state, path)
    differ = [
        f"{key.rpartition('.')[2]}={value} (config {key}={OmegaConf.select(cfg, key)})"
        for key, value in found.items()
        if value != OmegaConf.select(cfg, key)
    ]
    if differ:
        raise CheckpointError(
            f"{path} ({layout} layout) does not match model={cfg.choices.model} "
            f"method={cfg.choices.method}: {', '.join(differ)}"
        )
    config = OmegaConf.to_container(cfg, resolve=True)
    method = build_method(cfg.method.name, config["model"], config["method"], cfg.data.image_size)
    method.load_official(state, path)
    return method


def to_official(checkpoint: dict, encoder_only: bool = False) -> tuple[str, dict]:
    """(layout, payload) of one of our checkpoints in the released layout of its method."""
    if layout_of(checkpoint) != "bench":
        raise CheckpointError("not a checkpoint written by bench run")
    method = method_from_state(checkpoint["method"])
    if method.official_layout is None:
        raise CheckpointError(f"method {method.name} has no official layout")
    return method.official_layout, method.to_official(checkpoint, encoder_only)
