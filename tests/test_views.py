import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.core.data import to_rgb
from benchmark.core.loading import Transformed
from benchmark.core.views import (
    ACTION_DIM,
    PairedViews,
    Photometric,
    ViewConfig,
    action,
    apply_photometric,
    draw_source,
)

NONE = dict(jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)
ALL = dict(jitter=1.0, grayscale=1.0, blur=1.0, solarize=1.0)


def picture(size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return rgb.convert(mode)


def test_identical_treatments_give_the_null_action_and_identical_views():
    torch.manual_seed(0)
    out = PairedViews(ViewConfig(image_size=32, **NONE))(picture())
    assert torch.equal(out["action"], torch.zeros(ACTION_DIM))
    assert torch.equal(out["target"], out["source"])


def test_probability_one_applies_every_destructive_transform():
    cfg = ViewConfig(image_size=32, **ALL)
    torch.manual_seed(1)
    for _ in range(10):
        out = PairedViews(cfg)(picture())
        a = out["action"]
        assert a[4] == 1.0 and cfg.blur_sigma[0] <= a[5] <= cfg.blur_sigma[1] and a[6] == 1.0
        t = out["target_params"]
        assert abs(t["brightness"] - 1) <= 0.4 and abs(t["hue"]) <= 0.1 and t["grayscale"] == 0.0


def test_action_is_target_minus_source_jitter_plus_source_transforms():
    target = Photometric(1.2, 0.9, 1.1, 0.05)
    source = Photometric(0.8, 1.0, 1.0, -0.05, grayscale=1.0, blur_sigma=0.7, solarize=0.0)
    assert torch.allclose(action(target, source), torch.tensor([0.4, -0.1, 0.1, 0.1, 1.0, 0.7, 0.0]))


def test_recorded_parameters_recreate_the_target_view():
    cfg = ViewConfig(image_size=32, jitter=1.0)
    views = PairedViews(cfg)
    torch.manual_seed(3)
    out = views(picture())
    again = views.normalize(apply_photometric(out["crop"], Photometric(**out["target_params"])))
    assert torch.allclose(again, out["target"])
    assert not torch.allclose(out["target"], views.normalize(out["crop"]))


def test_source_transforms_change_the_pixels_the_way_they_should():
    crop = torch.rand(3, 16, 16)
    gray = apply_photometric(crop, Photometric(grayscale=1.0))
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    solar = apply_photometric(crop, Photometric(solarize=1.0))
    high = crop >= 0.5
    assert torch.allclose(solar[high], 1 - crop[high]) and torch.allclose(solar[~high], crop[~high])
    blurred = apply_photometric(crop, Photometric(blur_sigma=1.5))
    assert blurred.std() < crop.std()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
@pytest.mark.parametrize("size", [(7, 5), (64, 64), (300, 40)])
def test_odd_images_give_rgb_views_of_the_configured_size(mode, size):
    img = picture(size, "RGB" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(picture(size, "L"), dtype=np.uint16) * 257)
    out = PairedViews(ViewConfig(image_size=24, **ALL))(to_rgb(img))
    for key in ("target", "source"):
        assert out[key].shape == (3, 24, 24) and torch.isfinite(out[key]).all()


def test_sixteen_bit_images_are_rescaled_not_clipped():
    img = Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16))
    assert np.asarray(to_rgb(img))[0, 0, 0] == round(30000 / 65535 * 255)


def test_views_are_reproducible_in_dataloader_workers():
    images = [(picture((50, 40)), 0), (picture((20, 60)), 1)]
    ds = Transformed(images, PairedViews(ViewConfig(image_size=16)))

    def collate(items):
        return torch.stack([v["source"] for v, _, _ in items]), torch.stack([v["action"] for v, _, _ in items])

    keys = [[(0, 11, 5), (1, 12, 5)], [(1, 13, 6), (0, 14, 6)]]
    serial = list(torch.utils.data.DataLoader(ds, batch_sampler=keys, collate_fn=collate, num_workers=0))
    parallel = list(torch.utils.data.DataLoader(ds, batch_sampler=keys, collate_fn=collate, num_workers=2))
    for (a, b), (c, d) in zip(serial, parallel):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert not torch.equal(serial[0][0][0], serial[1][0][1])  # same image, other seed: other view


def test_bad_view_settings_are_refused():
    with pytest.raises(ValueError, match="solarize"):
        ViewConfig(solarize=1.5)
    with pytest.raises(ValueError, match="hue"):
        ViewConfig(hue=0.7)
    torch.manual_seed(0)
    assert draw_source(ViewConfig(**NONE)) == Photometric()


def torchvision_chain(crop, p, threshold=0.5):
    """The same treatment through torchvision's per-image functions, one view at a time."""
    import torchvision.transforms.functional as TF

    x = TF.adjust_brightness(crop, p.brightness)
    x = TF.adjust_contrast(x, p.contrast)
    x = TF.adjust_saturation(x, p.saturation)
    x = TF.adjust_hue(x, p.hue)
    if p.grayscale:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur_sigma:
        k = max(3, int(2 * round(3 * p.blur_sigma) + 1))
        x = TF.gaussian_blur(x, [k, k], [p.blur_sigma, p.blur_sigma])
    if p.solarize:
        x = TF.solarize(x, threshold)
    return x.clamp(0, 1)


def test_batched_photometric_matches_torchvision_view_by_view():
    torch.manual_seed(3)
    crop = torch.rand(3, 24, 20)
    crop[:, :4] = 0.5  # grey pixels: hue undefined, must stay grey
    cfg = ViewConfig(image_size=24, **ALL)
    treatments = [draw_source(cfg) for _ in range(12)] + [Photometric(), Photometric(hue=0.5), Photometric(hue=-0.5)]
    batched = apply_photometric(crop, treatments)
    assert batched.shape == (15, 3, 24, 20)
    for view, p in zip(batched, treatments):
        assert torch.allclose(view, torchvision_chain(crop, p), atol=2e-5), p
    # One view at a time gives the same as the batch.
    assert torch.allclose(apply_photometric(crop, treatments[3]), batched[3], atol=1e-6)


def test_the_paper_ijepa_crop_is_the_official_bilinear_one():
    """ijepa_vith14's view is the official I-JEPA training transform (src/transforms.py with the
    released config: RandomResizedCrop at torchvision's default bilinear resize, no flip, colour
    or blur, then ToTensor and Normalize); the CPU preset keeps bicubic."""
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image
    from torchvision import transforms as T

    from benchmark.config import load_config
    from benchmark.core.transforms import IMAGENET_MEAN, IMAGENET_STD
    from methods import build_method

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    official = T.Compose(
        [T.RandomResizedCrop(56, scale=(0.3, 1.0)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    views = {}
    for preset in ("ijepa_vith14", "ijepa"):
        cfg = load_config([f"method={preset}", "model=vit_micro", "data.image_size=56", "method.mask.min_keep=4"])
        method = build_method("ijepa", OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.method), 56)
        torch.manual_seed(3)
        views[preset] = method.train_transform()(image)
    torch.manual_seed(3)
    expected = official(image)
    assert torch.equal(views["ijepa_vith14"], expected)
    assert not torch.allclose(views["ijepa"], expected)
