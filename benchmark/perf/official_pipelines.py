"""Importing and building the official I-JEPA / MAE / DINO input pipelines from their checkouts
for `bench perf --data-path`.

They are imported from checkouts (nothing of them ships here) and fed as their training scripts
feed them: torchvision's ImageFolder, a DataLoader, and I-JEPA's `make_transforms` +
`MaskCollator` (src/transforms.py, src/masks/multiblock.py), MAE's `transform_train`
(main_pretrain.py, whose imports need timm 0.3.2: the statement is read from its source and
evaluated) with the default collate, DINO's `DataAugmentationDINO` (main_dino.py) with the
default collate. They get our preset's settings where they take them; where they hard-code one,
our preset must match it.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

from benchmark.perf.common import PerfError

# Files each official pipeline needs in its checkout.
OFFICIAL_FILES = {
    "ijepa": ("src/transforms.py", "src/masks/multiblock.py"),
    "mae": ("main_pretrain.py",),
    "dino": ("main_dino.py", "utils.py", "vision_transformer.py"),
}
OFFICIAL_NAMES = {"ijepa": "official I-JEPA", "mae": "official MAE", "dino": "official DINO"}


class OfficialCodeError(PerfError):
    """A folder that is not a usable checkout of the official code."""


def check_checkout(kind: str, checkout: str | Path) -> Path:
    """The checkout's root, after checking it holds what the official pipeline imports."""
    root = Path(checkout).expanduser().absolute()
    missing = [name for name in OFFICIAL_FILES[kind] if not (root / name).is_file()]
    if missing:
        raise OfficialCodeError(
            f"{root} is not a checkout of facebookresearch/{kind}: {', '.join(missing)} not found "
            f"(git clone https://github.com/facebookresearch/{kind})"
        )
    if kind in SOURCE_CHECKS:
        SOURCE_CHECKS[kind](root)
    return root


def _import_from(root: Path, names: list[str], packages: tuple[str, ...]) -> dict:
    """Modules imported from a checkout; modules of the same names imported before are dropped."""
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[name]
    try:
        return {name: importlib.import_module(name) for name in names}
    except Exception as e:  # noqa: BLE001 - any import failure means the same thing to the user
        raise OfficialCodeError(f"the official code in {root} does not import here: {type(e).__name__}: {e}") from e


def _mae_transform_source(root: Path) -> ast.expr:
    """The expression main_pretrain.py assigns to `transform_train`, and a check that its loader
    collates by default."""
    try:
        tree = ast.parse((root / "main_pretrain.py").read_text())
    except (SyntaxError, UnicodeDecodeError) as e:
        raise OfficialCodeError(f"{root / 'main_pretrain.py'} does not parse: {e}") from None
    values = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "transform_train" for t in node.targets)
    ]
    loaders = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "DataLoader"
    ]
    if len(values) != 1 or not loaders or any(k.arg == "collate_fn" for n in loaders for k in n.keywords):
        raise OfficialCodeError(
            f"{root / 'main_pretrain.py'} is not MAE's: one `transform_train = ...` and a DataLoader with the "
            "default collate expected"
        )
    return values[0]


def _ijepa(root: Path, cfg, size: int) -> tuple:
    m = cfg.method
    if m.mask.edge != "official" or tuple(m.mask.context_aspect) != (1.0, 1.0):
        raise PerfError(
            "the official I-JEPA collator draws square context blocks off the last row and column: "
            "its pair needs method.mask.edge=official method.mask.context_aspect=[1.0,1.0]"
        )
    code = _import_from(root, ["src.transforms", "src.masks.multiblock"], ("src",))
    transform = code["src.transforms"].make_transforms(
        crop_size=size,
        crop_scale=tuple(m.crop_scale),
        horizontal_flip=bool(m.get("flip", False)),
        color_distortion=False,
        gaussian_blur=False,
    )
    mask = m.mask
    collate = code["src.masks.multiblock"].MaskCollator(
        input_size=size,
        patch_size=int(cfg.model.patch_size),
        enc_mask_scale=tuple(mask.context_scale),
        pred_mask_scale=tuple(mask.target_scale),
        aspect_ratio=tuple(mask.target_aspect),
        nenc=1,
        npred=int(mask.num_targets),
        min_keep=int(mask.min_keep),
        allow_overlap=bool(mask.allow_overlap),
    )
    return transform, collate, lambda batch: len(batch[0][1])  # ((images, labels), enc, pred)


def _mae(root: Path, cfg, size: int) -> tuple:
    from torch.utils.data import default_collate
    from torchvision import transforms

    m = cfg.method
    if tuple(m.crop_scale) != (0.2, 1.0) or not m.flip:
        raise PerfError(
            "the official MAE crop is fixed at scale (0.2, 1.0) with flips: its pair needs "
            "method.crop_scale=[0.2,1.0] method.flip=true"
        )
    expression = ast.Expression(_mae_transform_source(root))
    code = compile(expression, str(root / "main_pretrain.py"), "eval")
    transform = eval(code, {"transforms": transforms}, {"args": SimpleNamespace(input_size=size)})
    return transform, default_collate, lambda batch: len(batch[1])


def _dino(root: Path, cfg, size: int) -> tuple:
    from torch.utils.data import default_collate

    m = cfg.method
    if size != 224 or int(m.local_crops.size) != 96:
        raise PerfError(
            "the official DINO crops are fixed at 224 and 96 px: its pair needs data.image_size=224 "
            "method.local_crops.size=96"
        )
    code = _import_from(root, ["main_dino"], ("main_dino", "utils", "vision_transformer"))
    transform = code["main_dino"].DataAugmentationDINO(
        tuple(m.global_crops.scale), tuple(m.local_crops.scale), int(m.local_crops.number)
    )
    return transform, default_collate, lambda batch: len(batch[1])


# Each official codebase's pipeline at our preset's settings, by `Method.official_pipeline`.
BUILDERS = {"ijepa": _ijepa, "mae": _mae, "dino": _dino}
# What a checkout must also let us read before anything is timed.
SOURCE_CHECKS = {"mae": _mae_transform_source}


def official_pipeline(kind: str, checkout: str, cfg) -> tuple:
    """(transform, collate, images in a batch) of an official pipeline, at our preset's settings."""
    if kind not in BUILDERS:
        raise PerfError(f"no official pipeline {kind!r} (known: {', '.join(BUILDERS)})")
    return BUILDERS[kind](check_checkout(kind, checkout), cfg, int(cfg.data.image_size))
