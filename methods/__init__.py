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


def build_method(name: str, model_cfg: dict, method_cfg: dict, image_size: int) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name](model_cfg, method_cfg, image_size)


def method_from_state(state: dict) -> Method:
    """Rebuild a method from `Method.checkpoint_state()`; strict about every weight."""
    method = build_method(state["method"], state["model_cfg"], state["method_cfg"], state["image_size"])
    load_weights(method, state["weights"], f"checkpoint of method {state['method']}")
    return method
