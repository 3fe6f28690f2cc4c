"""The training-step cases: reference configurations, variants, precisions and one case's overrides."""

from __future__ import annotations

# The reference configurations: ViT-tiny/16 at 224 px, batch 8.
_TINY_224 = ["model=vit_tiny", "data.image_size=224", "pretrain.batch_size=8"]
CPU_CASES = {
    "ijepa": [
        "method=ijepa",
        *_TINY_224,
        "method.predictor.depth=6",
        "method.predictor.width=384",
        "method.mask.min_keep=10",
    ],
    "iwm": [
        "method=iwm",
        *_TINY_224,
        "method.predictor.depth=6",
        "method.predictor.width=384",
        "method.mask.min_keep=10",
    ],
    "mae": [
        "method=mae",
        *_TINY_224,
        "method.predictor.depth=4",
        "method.predictor.width=128",
        "method.mask_ratio=0.75",
    ],
}
# Paper-sized ViT-B/16 cases for a GPU (the IWM, I-JEPA-like and MAE presets at 224 px).
_BASE_224 = ["model=vit_base", "data.image_size=224", "pretrain.batch_size=128"]
GPU_CASES = {
    "ijepa": [
        "method=ijepa",
        *_BASE_224,
        "method.predictor.depth=12",
        "method.predictor.width=384",
        "method.mask.min_keep=10",
    ],
    "iwm": ["method=iwm_equi_18_384", *_BASE_224],
    "mae": ["method=mae_paper", *_BASE_224],
    # main_dino.py's defaults: 65536 prototypes, 8 local crops of 96 px.
    "dino": [
        "method=dino",
        *_BASE_224,
        "method.head.out_dim=65536",
        "method.head.hidden_dim=2048",
        "method.local_crops.number=8",
        "method.local_crops.size=96",
    ],
}
# `compiled` (the defaults, compiled) is timed where asked for (--variants), beside or instead of --compile.
VARIANTS = {
    "eager": ["pretrain.fused_adamw=false", "pretrain.compile=false", "pretrain.attention=fused"],
    "fast": [],
    "compiled": ["pretrain.compile=true"],
}
DEFAULT_VARIANTS = ("eager", "fast")
PRECISIONS = ("fp32", "bf16")


def case_overrides(method: str, precision: str, variant: str, gpu: bool, compile: bool, extra: list[str]) -> list[str]:
    """The config overrides of one case: the reference case (any other method preset: the preset
    at the reference size), then the user's, then the variant's."""
    base = (GPU_CASES if gpu else CPU_CASES).get(method) or [f"method={method}", *(_BASE_224 if gpu else _TINY_224)]
    out = [*base, *extra, f"pretrain.bf16={precision == 'bf16'}", *VARIANTS[variant]]
    if variant == "fast" and compile:
        out.append("pretrain.compile=true")
    return out


def _sized_data(overrides: list[str], images: int) -> list[str]:
    """Make the built-in data just big enough for the steps (generated once, then cached)."""
    from benchmark.config import load_config

    cfg = load_config(overrides)
    if cfg.data.kind != "builtin":
        return overrides
    return [
        *overrides,
        f"data.num_train={max(images, cfg.pretrain.batch_size)}",
        f"data.num_val={cfg.pretrain.batch_size}",
    ]


def available_methods() -> list[str]:
    """Every method preset (`bench list`): the three reference cases first, then the others."""
    from benchmark.config import group_options

    presets = group_options("method")
    return [m for m in CPU_CASES if m in presets] + [m for m in presets if m not in CPU_CASES]


def _batch_size(overrides: list[str]) -> int:
    from benchmark.config import load_config

    return int(load_config(overrides).pretrain.batch_size)
