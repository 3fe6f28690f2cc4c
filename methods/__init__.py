"""The method registry: every pretraining method, by the name used in `method=<name>`."""

from __future__ import annotations

import torch

from benchmark.core.checkpoint import load_weights
from methods.base import Method
from methods.dino import DINO
from methods.ijepa import IJEPA
from methods.iwm import IWM
from methods.mae import MAE

METHODS: dict[str, type[Method]] = {
    "ijepa": IJEPA,
    "iwm": IWM,
    "mae": MAE,
    "dino": DINO,
}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under its `name` (usable as a class decorator).

    A method defined outside this package (a plug-in, a test) becomes known to `build_method`,
    checkpoints and every task through this alone.
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a Method subclass")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is registered already ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


# The geometry every encoder declares (methods.vit.set_geometry sets it): the tasks read it.
ENCODER_GEOMETRY = ("img_size", "patch_size", "grid", "num_patches", "embed_dim", "depth")


def check_encoder(method: Method) -> None:
    """The encoder contract: an nn.Module declaring its geometry as integers that agree with each
    other and with the method's image size. TypeError naming what is missing or wrong."""
    encoder = getattr(method, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise TypeError(f"method {method.name}: self.encoder must be an nn.Module, got {type(encoder).__name__}")
    for attr in ENCODER_GEOMETRY:
        value = getattr(encoder, attr, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TypeError(
                f"method {method.name}: its encoder does not declare {attr} as a positive integer (got {value!r}); "
                "methods.vit.set_geometry declares the geometry"
            )
    if encoder.grid * encoder.patch_size != method.image_size or encoder.num_patches != encoder.grid**2:
        raise TypeError(
            f"method {method.name}: its encoder's geometry disagrees (grid {encoder.grid} x patch "
            f"{encoder.patch_size} for {method.image_size} px, {encoder.num_patches} patches)"
        )


def build_method(name: str, model_cfg: dict, method_cfg: dict, image_size: int) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    method = METHODS[name](model_cfg, method_cfg, image_size)
    check_encoder(method)
    return method


def method_from_state(state: dict) -> Method:
    """Rebuild a method from `Method.checkpoint_state()`; strict about every weight."""
    method = build_method(state["method"], state["model_cfg"], state["method_cfg"], state["image_size"])
    load_weights(method, state["weights"], f"checkpoint of method {state['method']}")
    return method
