"""IWM's paired views: one image, one shared crop, two photometric treatments, and the action.

The target view is the crop with a colour jitter; the source view is the same crop with an
independently drawn jitter followed by the destructive transforms (grayscale, blur,
solarization). The action tells the world model how to get from source to target:
target-minus-source jitter factors, then the strength of each destructive transform applied to
the source (0 when not applied). Identical treatments give the null action (all zeros).

Jitter factors are applied in one fixed order (brightness, contrast, saturation, hue) so that a
parameter vector defines its transform: `apply_photometric(crop, params)` re-creates any view,
which is what the MRR bank of transformations needs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from benchmark.data import IMAGENET_MEAN, IMAGENET_STD

# Action layout; the geometric part of the action is carried by the mask tokens' positions.
ACTION_NAMES = ("brightness", "contrast", "saturation", "hue", "grayscale", "blur_sigma", "solarize")
ACTION_DIM = len(ACTION_NAMES)


@dataclass(frozen=True)
class ViewConfig:
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.3, 1.0)
    flip: float = 0.5
    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # The paper's prose says 0.2, its appendix table 0.1.
    solarize: float = 0.2
    solarize_threshold: float = 0.5

    def __post_init__(self):
        for name in ("flip", "jitter", "grayscale", "blur", "solarize"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"view probability {name} must be in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"view jitter strength {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"view jitter strength hue must be in [0, 0.5], got {self.hue}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"view blur_sigma must satisfy 0 < min <= max, got {(lo, hi)}")


@dataclass(frozen=True)
class Photometric:
    """One photometric treatment: jitter factors (identity = 1, 1, 1, 0) and destructive strengths."""
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    grayscale: float = 0.0
    blur_sigma: float = 0.0
    solarize: float = 0.0

    def vector(self) -> torch.Tensor:
        return torch.tensor([getattr(self, n) for n in ACTION_NAMES], dtype=torch.float32)


def action(target: Photometric, source: Photometric) -> torch.Tensor:
    """[ACTION_DIM]: target-minus-source jitter factors, then what was done to the source."""
    jitter = target.vector()[:4] - source.vector()[:4]
    return torch.cat([jitter, source.vector()[4:]])


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def draw_jitter(cfg: ViewConfig) -> Photometric:
    """Jitter factors like torchvision's ColorJitter, applied with probability cfg.jitter."""
    if torch.rand(()).item() >= cfg.jitter:
        return Photometric()
    return Photometric(brightness=_uniform(1 - cfg.brightness, 1 + cfg.brightness),
                       contrast=_uniform(1 - cfg.contrast, 1 + cfg.contrast),
                       saturation=_uniform(1 - cfg.saturation, 1 + cfg.saturation),
                       hue=_uniform(-cfg.hue, cfg.hue))


def draw_source(cfg: ViewConfig) -> Photometric:
    """An independent jitter plus the destructive transforms, each with its own probability."""
    jitter = draw_jitter(cfg)
    gray = float(torch.rand(()).item() < cfg.grayscale)
    blur = _uniform(*cfg.blur_sigma) if torch.rand(()).item() < cfg.blur else 0.0
    solar = float(torch.rand(()).item() < cfg.solarize)
    return Photometric(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, gray, blur, solar)


def apply_photometric(crop: torch.Tensor, p: Photometric, solarize_threshold: float = 0.5) -> torch.Tensor:
    """Apply a treatment to an RGB crop in [0, 1] ([3, H, W]); fixed order, deterministic."""
    x = TF.adjust_brightness(crop, p.brightness)
    x = TF.adjust_contrast(x, p.contrast)
    x = TF.adjust_saturation(x, p.saturation)
    x = TF.adjust_hue(x, p.hue)
    if p.grayscale:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur_sigma > 0:
        # Kernel covering +-3 sigma, odd, at least 3 pixels.
        k = max(3, int(2 * round(3 * p.blur_sigma) + 1))
        x = TF.gaussian_blur(x, [k, k], [p.blur_sigma, p.blur_sigma])
    if p.solarize:
        x = TF.solarize(x, solarize_threshold)
    return x.clamp(0, 1)


class PairedViews:
    """PIL image -> (target view, source view, action, target treatment, crop), normalised views.

    Random choices use torch's global RNG, so the data pipeline's per-sample seeding
    (benchmark.data.Transformed) makes the views reproducible in any DataLoader worker.
    """

    def __init__(self, cfg: ViewConfig):
        self.cfg = cfg
        self.crop = T.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.crop_scale),
                                        interpolation=T.InterpolationMode.BICUBIC)
        self.normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def shared_crop(self, image: Image.Image) -> torch.Tensor:
        x = TF.to_tensor(self.crop(image)).clamp(0, 1)  # bicubic can overshoot [0, 1]
        if torch.rand(()).item() < self.cfg.flip:
            x = TF.hflip(x)
        return x

    def __call__(self, image: Image.Image) -> dict:
        crop = self.shared_crop(image)
        target, source = draw_jitter(self.cfg), draw_source(self.cfg)
        return {"target": self.normalize(apply_photometric(crop, target, self.cfg.solarize_threshold)),
                "source": self.normalize(apply_photometric(crop, source, self.cfg.solarize_threshold)),
                "action": action(target, source),
                "target_params": asdict(target),
                "crop": crop}
