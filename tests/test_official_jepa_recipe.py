"""The attentive probe's paper preset against the official V-JEPA frozen image classification
eval. The fixture tests/fixtures/official/jepa_attentive_recipe.json was read off the official
files by scripts/fixtures/jepa_attentive_recipe.py (see its docstring); the head itself is
checked in tests/test_official_attentive.py."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from timm.data import create_transform

from benchmark.config import load_config
from benchmark.core.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, recipe_transform
from tasks.recipe import lr_schedule, wd_schedule

OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "official" / "jepa_attentive_recipe.json").read_text())


@pytest.fixture(scope="module")
def preset():
    cfg = OmegaConf.to_container(load_config(["method=iwm", "task=paper"]), resolve=True)
    return cfg["tasks"]["attentive"]


def test_optimisation_settings_equal_the_official_eval(preset):
    opt = OFFICIAL["optimization"]
    assert preset["epochs"] == opt["num_epochs"] and preset["batch_size"] == OFFICIAL["global_batch"]
    assert preset["lr"] == opt["lr"] and opt["start_lr"] == opt["lr"]  # no warmup ramp
    assert preset["warmup_epochs"] == opt["warmup"] and preset["min_lr"] == opt["final_lr"]
    assert preset["weight_decay"] == opt["weight_decay"]
    assert preset["final_weight_decay"] == OFFICIAL["init_opt_defaults"]["final_wd"]
    assert preset["betas"] == [0.9, 0.999]  # torch.optim.AdamW(param_groups): its defaults
    assert preset["clip_grad"] == OFFICIAL["clip_grad"]
    assert OFFICIAL["autocast_dtype"] == "torch.float16" and preset["precision"] == "fp16"
    assert (preset["label_smoothing"], preset["mixup"], preset["cutmix"]) == (0.0, 0.0, 0.0)
    assert preset["head"] == "attentive" and preset["inputs"] == "images"


def test_lr_and_weight_decay_schedules_equal_the_official_schedulers(preset):
    sched = OFFICIAL["schedule"]
    cfg = dict(preset, epochs=sched["epochs"])
    total, lr_at = lr_schedule(cfg, sched["iterations_per_epoch"])
    wd_at = wd_schedule(cfg, total)
    assert [lr_at(s) for s in range(total)] == pytest.approx(sched["lrs"], rel=1e-12, abs=1e-15)
    assert [wd_at(s) for s in range(total)] == pytest.approx(sched["weight_decays"], rel=1e-12, abs=1e-15)


def test_training_and_val_transforms_equal_the_official_calls(preset):
    kwargs = dict(OFFICIAL["train_transform"], input_size=32, is_training=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    official = create_transform(**kwargs)
    ours = recipe_transform(
        32,
        preset["crop_scale"],
        preset["flip"],
        preset["auto_augment"],
        preset["reprob"],
        preset["remode"],
        preset["recount"],
    )
    assert repr(ours) == repr(official)
    # The official val Resize names no interpolation: torchvision's default, bilinear.
    assert set(OFFICIAL["val_resize_kwargs"]) == {"size"} and preset["eval_interpolation"] == "bilinear"
    resize = eval_transform(224, preset["eval_interpolation"]).transforms[0]
    assert resize.size == int(224 * 256 / 224) and resize.interpolation.value == "bilinear"
