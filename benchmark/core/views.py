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

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from benchmark.core.transforms import IMAGENET_MEAN, IMAGENET_STD

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
        for name in ("crop_scale", "blur_sigma"):
            pair = getattr(self, name)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                shown = list(pair) if isinstance(pair, tuple) else pair
                raise ValueError(f"view {name} must be two numbers [min, max], got {shown!r}")
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
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"view crop_scale must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if not 0.0 <= self.solarize_threshold <= 1.0:
            raise ValueError(f"view solarize_threshold must be in [0, 1], got {self.solarize_threshold}")


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
    return Photometric(
        brightness=_uniform(1 - cfg.brightness, 1 + cfg.brightness),
        contrast=_uniform(1 - cfg.contrast, 1 + cfg.contrast),
        saturation=_uniform(1 - cfg.saturation, 1 + cfg.saturation),
        hue=_uniform(-cfg.hue, cfg.hue),
    )


def draw_source(cfg: ViewConfig) -> Photometric:
    """An independent jitter plus the destructive transforms, each with its own probability."""
    jitter = draw_jitter(cfg)
    gray = float(torch.rand(()).item() < cfg.grayscale)
    blur = _uniform(*cfg.blur_sigma) if torch.rand(()).item() < cfg.blur else 0.0
    solar = float(torch.rand(()).item() < cfg.solarize)
    return Photometric(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, gray, blur, solar)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma [B, 1, H, W] of RGB images [B, 3, H, W] (torchvision's weights)."""
    r, g, b = x.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    value, _ = x.max(-3)
    low, _ = x.min(-3)
    chroma = value - low
    grey = chroma == 0
    safe_chroma = torch.where(grey, torch.ones_like(chroma), chroma)
    saturation = chroma / torch.where(value == 0, torch.ones_like(value), value)
    # Hue in sixths of a turn, from whichever channel holds the maximum (red wins ties).
    hue = torch.where(
        value == r,
        (g - b) / safe_chroma,
        torch.where(value == g, 2.0 + (b - r) / safe_chroma, 4.0 + (r - g) / safe_chroma),
    )
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return torch.stack([torch.remainder(hue / 6.0, 1.0), saturation, value], -3)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = x.unbind(-3)
    # Each channel is value minus a piecewise-linear ramp of the hue (the hexcone model).
    channels = []
    for shift in (5.0, 3.0, 1.0):  # red, green, blue
        k = torch.remainder(shift + hue * 6.0, 6.0)
        ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
        channels.append(value - value * saturation * ramp)
    return torch.stack(channels, -3)


def apply_photometric(
    crops: torch.Tensor, treatments: Photometric | Sequence[Photometric], solarize_threshold: float = 0.5
) -> torch.Tensor:
    """Apply treatments to RGB crops in [0, 1]; fixed order, deterministic.

    One crop [3, H, W] with one treatment gives one view [3, H, W]; crops [B, 3, H, W] (or one
    crop, shared) with B treatments give B views in one batched pass, which is what makes a bank
    of hundreds of views per image cheap. Matches torchvision's adjust_brightness, _contrast,
    _saturation, _hue, rgb_to_grayscale, gaussian_blur and solarize applied one view at a time.
    """
    single = isinstance(treatments, Photometric)
    batch = [treatments] if single else list(treatments)
    x = crops if crops.dim() == 4 else crops.unsqueeze(0)
    x = x.expand(len(batch), -1, -1, -1)

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(t, name) for t in batch], dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)

    x = (x * column("brightness")).clamp(0, 1)
    x = _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), column("contrast"))
    x = _blend(x, _gray(x), column("saturation"))
    hue = column("hue")
    if hue.any():
        hsv = _rgb_to_hsv(x)
        hsv = torch.cat([torch.remainder(hsv[:, :1] + hue, 1.0), hsv[:, 1:]], dim=1)
        x = _hsv_to_rgb(hsv)
    x = torch.where(column("grayscale") > 0, _gray(x).expand_as(x), x)
    sigmas = [t.blur_sigma for t in batch]
    for sigma in sorted(set(sigmas) - {0.0}):
        rows = [i for i, s in enumerate(sigmas) if s == sigma]
        # Kernel covering +-3 sigma, odd, at least 3 pixels.
        k = max(3, int(2 * round(3 * sigma) + 1))
        x[rows] = TF.gaussian_blur(x[rows], [k, k], [sigma, sigma])
    x = torch.where((column("solarize") > 0) & (x >= solarize_threshold), 1.0 - x, x)
    x = x.clamp(0, 1)
    return x[0] if single else x


class PairedViews:
    """PIL image -> (target view, source view, action, target treatment, crop), normalised views.

    Random choices use torch's global RNG, so the data pipeline's per-sample seeding
    (benchmark.core.loading.Transformed) makes the views reproducible in any DataLoader worker.
    """

    def __init__(self, cfg: ViewConfig):
        self.cfg = cfg
        self.crop = T.RandomResizedCrop(
            cfg.image_size, scale=tuple(cfg.crop_scale), interpolation=T.InterpolationMode.BICUBIC
        )
        self.normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def shared_crop(self, image: Image.Image) -> torch.Tensor:
        x = TF.to_tensor(self.crop(image)).clamp(0, 1)  # bicubic can overshoot [0, 1]
        if torch.rand(()).item() < self.cfg.flip:
            x = TF.hflip(x)
        return x

    def __call__(self, image: Image.Image) -> dict:
        crop = self.shared_crop(image)
        target, source = draw_jitter(self.cfg), draw_source(self.cfg)
        return {
            "target": self.normalize(apply_photometric(crop, target, self.cfg.solarize_threshold)),
            "source": self.normalize(apply_photometric(crop, source, self.cfg.solarize_threshold)),
            "action": action(target, source),
            "target_params": asdict(target),
            "crop": crop,
        }
