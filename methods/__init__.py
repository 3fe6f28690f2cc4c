"""The method registry: every pretraining method, by the name used in `method=<name>`."""

from __future__ import annotations

from benchmark.core.checkpoint import load_weights
from methods.base import Method
from methods.ijepa import IJEPA
from methods.iwm import IWM
from methods.mae import MAE

METHODS: dict[str, type[Method]] = {
    "ijepa": IJEPA,
    "iwm": IWM,
    "mae": MAE,
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


def build_method(name: str, model_cfg: dict, method_cfg: dict, image_size: int) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name](model_cfg, method_cfg, image_size)


def method_from_state(state: dict) -> Method:
    """Rebuild a method from `Method.checkpoint_state()`; strict about every weight."""
    method = build_method(state["method"], state["model_cfg"], state["method_cfg"], state["image_size"])
    load_weights(method, state["weights"], f"checkpoint of method {state['method']}")
    return method
