"""Image transforms: normalisation, the eval view, the plain training crop, and the training
augmentations of the paper-scale evaluation recipes.

- `eval_transform`: resize by the 224/256 ratio, centre crop (bicubic, or bilinear for V-JEPA's
  attentive probe);
- `crop_transform`: RandomResizedCrop (+ flip), the CPU presets' training view;
- `OneDrawResizedCrop`: the random resized crop of MAE's linear probe. It draws the area and the
  aspect ratio once and clamps the box to the image (the TensorFlow/BYOL way) where torchvision
  retries up to ten times and falls back to a centre crop, so the two give different crops.
- `recipe_transform`: the finetuning pipeline of MAE (`util/datasets.py`), i.e. timm's
  `create_transform` with RandAugment and random erasing, called with the recipe's arguments;
- `MultiCrop`: DINO's pretraining views (`main_dino.py`'s DataAugmentationDINO): 2 global and N
  local crops with its photometric augmentations.

They draw from torch's, Python's and numpy's global RNGs (timm's RandAugment and erasing use
the latter two); `loading.Transformed` seeds all three per sample, so a view depends only on
its sample seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from PIL import ImageFilter, ImageOps
from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize() -> T.Normalize:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


# The resize of an eval view: bicubic (MAE's evaluations) or bilinear (torchvision's default,
# which the V-JEPA attentive probe's val transform keeps).
INTERPOLATIONS = ("bicubic", "bilinear")


def eval_transform(image_size: int, interpolation: str = "bicubic") -> Callable:
    # Resize by the standard 224/256 ratio (truncated, as MAE's eval transform does), then centre crop.
    return T.Compose(
        [
            T.Resize(int(image_size / (224 / 256)), interpolation=T.InterpolationMode(interpolation)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            normalize(),
        ]
    )


def crop_transform(
    image_size: int, scale: Sequence[float], flip: bool = False, interpolation: str = "bicubic"
) -> Callable:
    """RandomResizedCrop (+ optional horizontal flip) to a normalised tensor; `interpolation` is
    one of INTERPOLATIONS (the official I-JEPA crop is torchvision's default, bilinear)."""
    mode = T.InterpolationMode(interpolation)
    steps = [T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=mode)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), normalize()])


class OneDrawResizedCrop(T.RandomResizedCrop):
    """RandomResizedCrop with one draw of (area, log aspect ratio) and the box clamped to the image."""

    @staticmethod
    def get_params(img, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
        width, height = F.get_image_size(img)
        # float32 draws, so that a seed gives the same box as the official crop does.
        area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_low, log_high = torch.log(torch.tensor(ratio)).tolist()
        aspect = torch.empty(1).uniform_(log_low, log_high).exp().item()
        w = min(width, int(round(math.sqrt(area * aspect))))
        h = min(height, int(round(math.sqrt(area / aspect))))
        top = int(torch.randint(0, height - h + 1, size=(1,)).item())
        left = int(torch.randint(0, width - w + 1, size=(1,)).item())
        return top, left, h, w


def probe_transform(image_size: int, scale: Sequence[float] = (0.08, 1.0)) -> Callable:
    """MAE's linear-probe training view: one-draw resized crop (bicubic) + flip, normalised."""
    crop = OneDrawResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), normalize()])


def recipe_transform(
    image_size: int,
    scale: Sequence[float],
    flip: bool,
    auto_augment: str | None,
    reprob: float,
    remode: str,
    recount: int,
) -> Callable:
    """MAE finetuning's training view through timm's create_transform: random resized crop
    (bicubic), flip, RandAugment (`auto_augment`, e.g. rand-m9-mstd0.5-inc1; no colour jitter
    beside it, as MAE passes none), normalisation, random erasing (`reprob`, `remode`, `recount`)."""
    return create_transform(
        input_size=image_size,
        is_training=True,
        scale=tuple(scale),
        hflip=0.5 if flip else 0.0,
        color_jitter=None,
        auto_augment=auto_augment,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


class RandomBlur:
    """Gaussian blur with probability p and a radius drawn uniformly (Python's RNG, as officially)."""

    def __init__(self, p: float, radius: tuple[float, float]):
        self.p, self.radius = p, radius

    def __call__(self, image):
        if random.random() > self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius)))


class RandomSolarize:
    """Solarisation (threshold 128) with probability p (Python's RNG, as officially)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image):
        return ImageOps.solarize(image) if random.random() < self.p else image


class MultiCrop:
    """DINO's views of one image: 2 global crops, then `number` local crops.

    Each crop: random resized crop (bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with
    probability 0.8, grayscale 0.2, then blur with probability 1.0 / 0.1 / 0.5 (first global,
    second global, local) and solarisation 0.2 on the second global crop; normalised.
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        number: int,
        global_scale: tuple[float, float],
        local_scale: tuple[float, float],
        blur_radius: tuple[float, float],
    ):
        flip_and_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        )
        finish = T.Compose([T.ToTensor(), normalize()])

        def view(size: int, scale, *photometric) -> T.Compose:
            crop = T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC)
            return T.Compose([crop, flip_and_jitter, *photometric, finish])

        radius = tuple(blur_radius)
        self.first = view(global_size, global_scale, RandomBlur(1.0, radius))
        self.second = view(global_size, global_scale, RandomBlur(0.1, radius), RandomSolarize(0.2))
        self.local = view(local_size, local_scale, RandomBlur(0.5, radius))
        self.number = number

    def __call__(self, image) -> list[torch.Tensor]:
        return [self.first(image), self.second(image), *(self.local(image) for _ in range(self.number))]
