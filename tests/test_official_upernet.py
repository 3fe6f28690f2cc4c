"""task=ade20k_upernet against mmsegmentation's MAE ViT-B UperNet ADE20k recipe.

The fixture holds the official config's resolved values and what the official code computes
from them (scripts/fixtures/mmseg_upernet.py says how to regenerate it); these tests read only
the JSON, so they run without mmseg. The last one re-reads the config live when mmseg is
installed and checks the fixture is current.
"""

import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from benchmark.config import load_config
from benchmark.core.transforms import IMAGENET_MEAN, IMAGENET_STD
from methods import build_method
from tasks.ade20k import lr_factor, seg_loss
from tasks.segmentation import data, mmseg_backend
from tasks.segmentation.backbone import SCALES, level_blocks
from tasks.segmentation.metrics import IGNORE_INDEX
from tasks.segmentation.model import AUX_LEVEL, Segmenter

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "official" / "mmseg_upernet_mae.json").read_text())
# Our training pipeline's steps, in order, as mmseg names them (tasks/segmentation/data.py).
TRAIN_STEPS = [
    "LoadImageFromFile",
    "LoadAnnotations",
    "RandomResize",
    "RandomCrop",
    "RandomFlip",
    "PhotoMetricDistortion",
    "PackSegInputs",
]
TEST_STEPS = ["LoadImageFromFile", "Resize", "LoadAnnotations", "PackSegInputs"]


def preset(*overrides: str) -> dict:
    cfg = load_config(["task=ade20k_upernet", *overrides])
    return OmegaConf.to_container(cfg.tasks.ade20k, resolve=True)


def check_recipe(o: dict, c: dict) -> None:
    """Every value of the official recipe that our preset sets, equal."""
    wrapper, model = o["optim_wrapper"], o["model"]
    opt, paramwise = wrapper["optimizer"], wrapper["paramwise_cfg"]
    assert opt["type"] == "AdamW" and wrapper["constructor"] == "LayerDecayOptimizerConstructor"
    assert [c["lr"], c["betas"], c["weight_decay"]] == [opt["lr"], opt["betas"], opt["weight_decay"]]
    assert wrapper.get("clip_grad") is None  # ours: no clipping
    assert c["layer_decay"] == paramwise["layer_decay_rate"]
    backbone = model["backbone"]
    assert paramwise["num_layers"] == backbone["num_layers"]
    # Schedule: LinearLR warmup then PolyLR to eta_min, by iteration.
    warmup, poly = o["param_scheduler"]
    assert warmup == dict(
        type="LinearLR", start_factor=c["warmup_ratio"], by_epoch=False, begin=0, end=c["warmup_iters"]
    )
    assert poly == dict(
        type="PolyLR",
        eta_min=c["min_lr_ratio"] * c["lr"],
        power=c["poly_power"],
        begin=c["warmup_iters"],
        end=c["iters"],
        by_epoch=False,
    )
    assert o["train_cfg"]["type"] == "IterBasedTrainLoop" and o["train_cfg"]["max_iters"] == c["iters"]
    assert o["per_gpu_batch"] == o["train_dataloader"]["batch_size"]
    assert o["gpus"] * o["train_dataloader"]["batch_size"] == c["batch_size"]
    # AMP: fp16 with a dynamic loss scale in training; mmengine's ValLoop runs in fp32.
    assert o["fp16"] == {"loss_scale": "dynamic"} and c["precision"] == "fp16"
    assert o["val_loop_fp16"] is False and c["eval_precision"] == "fp32"
    # Backbone: blocks 4/6/8/12 raw (no final norm), drop path, layer scale, 512 px position table.
    assert level_blocks(backbone["num_layers"]) == [i + 1 for i in backbone["out_indices"]]
    assert model["backbone_final_norm"] is False
    assert backbone["type"] == "MAE" and backbone["img_size"] == [c["crop_size"]] * 2
    assert c["crop_size"] % backbone["patch_size"] == 0
    assert backbone["drop_path_rate"] == c["drop_path"] and backbone["init_values"] == c["layer_scale"]
    assert c["train_pos_embed"] is True
    rel_pos = any(n.endswith("relative_position_bias_table") for n in o["layer_decay"]["params"])
    assert c["rel_pos_bias"] == rel_pos
    neck = model["neck"]
    assert neck["type"] == "Feature2Pyramid" and neck["rescales"] == list(SCALES)
    assert model["neck_norm_cfg"]["type"] in ("SyncBN", "BN")  # one process: SyncBN is BN
    head, aux = model["decode_head"], model["auxiliary_head"]
    assert head["type"] == "UPerHead" and head["in_index"] == [0, 1, 2, 3]
    assert head["pool_scales"] == c["pool_scales"] and head["channels"] == c["channels"]
    assert head["dropout_ratio"] == c["dropout"] and head["num_classes"] == c["num_classes"]
    assert head["align_corners"] is False and head["norm_cfg"]["type"] in ("SyncBN", "BN")
    assert head["loss_decode"]["type"] == "CrossEntropyLoss" and head["loss_decode"]["use_sigmoid"] is False
    assert head["loss_decode"]["loss_weight"] == 1.0
    assert aux["type"] == "FCNHead" and aux["in_index"] == AUX_LEVEL and aux["channels"] == c["aux_channels"]
    assert aux["num_convs"] == 1 and aux["concat_input"] is False and model["aux_kernel_size"] == 3
    assert aux["dropout_ratio"] == c["dropout"] and aux["num_classes"] == c["num_classes"]
    assert aux["align_corners"] is False and aux["loss_decode"]["loss_weight"] == c["aux_weight"]
    assert c["backend"] == "auto" and c["head_init"] == "mmseg"  # mmseg's heads, or their init
    test_cfg = model["test_cfg"]
    assert test_cfg == dict(mode="slide", crop_size=[c["crop_size"]] * 2, stride=[c["stride"]] * 2)
    # Data: mmseg's normalisation and padding, the training and test pipelines.
    pre = model["data_preprocessor"]
    assert pre["mean"] == pytest.approx([255 * m for m in IMAGENET_MEAN])
    assert pre["std"] == pytest.approx([255 * s for s in IMAGENET_STD])
    assert pre["bgr_to_rgb"] is True and pre["pad_val"] == 0 and pre["seg_pad_val"] == IGNORE_INDEX
    assert pre["size"] == [c["crop_size"]] * 2
    train = o["train_dataloader"]["pipeline"]
    assert [s["type"] for s in train] == TRAIN_STEPS
    steps = {s["type"]: s for s in train}
    assert steps["LoadAnnotations"]["reduce_zero_label"] == c["reduce_zero_label"]
    resize = steps["RandomResize"]
    assert resize["scale"] == c["scale"] and resize["ratio_range"] == c["ratio_range"] and resize["keep_ratio"]
    assert steps["RandomCrop"] == dict(
        type="RandomCrop", crop_size=[c["crop_size"]] * 2, cat_max_ratio=c["cat_max_ratio"]
    )
    assert steps["RandomFlip"] == dict(type="RandomFlip", prob=c["flip"])
    assert steps["PhotoMetricDistortion"] == dict(type="PhotoMetricDistortion") and c["photometric"]
    for split in ("val_dataloader", "test_dataloader"):
        loader = o[split]
        assert loader["batch_size"] == c["eval_batch_size"]
        assert [s["type"] for s in loader["pipeline"]] == TEST_STEPS
        steps = {s["type"]: s for s in loader["pipeline"]}
        assert steps["Resize"] == dict(type="Resize", scale=c["scale"], keep_ratio=True)
        assert steps["LoadAnnotations"]["reduce_zero_label"] == c["reduce_zero_label"]


def test_the_paper_preset_is_the_official_recipe():
    check_recipe(FIXTURE, preset())


def test_the_lr_of_each_iteration_is_mmengines():
    c = preset()
    ours = {it: c["lr"] * lr_factor(int(it), c) for it in FIXTURE["lr"]}
    assert ours == pytest.approx(FIXTURE["lr"], rel=1e-9, abs=1e-18)


# mmseg's MAE backbone parameter -> ours (methods/mae.py's encoder, its attention wrapped with a
# relative position bias table).
BACKBONE_NAMES = [
    (r"cls_token|pos_embed", r"\g<0>"),
    (r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"layers\.(\d+)\.ln([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"layers\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.inner.\2.\3"),
    (r"layers\.(\d+)\.attn\.relative_position_bias_table", r"blocks.\1.attn.table"),
    (r"layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layers\.(\d+)\.gamma_([12])", r"blocks.\1.ls\2.gamma"),
]


def our_name(official: str) -> str:
    for pattern, replacement in BACKBONE_NAMES:
        if re.fullmatch(pattern, official):
            return re.sub(pattern, replacement, official)
    raise AssertionError(f"no counterpart for mmseg's backbone.{official}")


def tiny_segmenter(backend: str = "native") -> Segmenter:
    t = FIXTURE["layer_decay"]["tiny"]
    overrides = [
        "method=mae",
        "model.patch_size=16",
        f"model.embed_dim={t['embed_dims']}",
        f"model.num_heads={t['num_heads']}",
        f"model.depth={t['num_layers']}",
        "method.predictor.depth=1",
        "method.predictor.width=8",
        "method.predictor.num_heads=2",
        "data.image_size=32",
    ]
    cfg = load_config(["task=ade20k_upernet", *overrides])
    method = build_method(
        "mae", OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.method, resolve=True), 32
    )
    # 64 px crops: the 2 x 2 pretraining table is resampled to 4 x 4 and trained there.
    c = dict(preset(), crop_size=64, channels=t["channels"], aux_channels=t["aux_channels"])
    return Segmenter(method, "encoder", "encoder", "upernet", t["num_classes"], c, backend)


BACKENDS = [
    "native",
    pytest.param("mmseg", marks=pytest.mark.skipif(mmseg_backend.missing_reason() is not None, reason="mmseg absent")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimiser_groups_are_the_layer_decay_constructors(backend):
    model = tiny_segmenter(backend)
    c = preset()
    groups = model.param_groups(c["weight_decay"], c["layer_decay"], 1.0)
    ours = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(ours) == sum(len(g["params"]) for g in groups)  # each parameter in one group
    encoder = dict(model.encoder.named_parameters())
    matched, heads = set(), {"official": set(), "ours": set()}
    for name, (scale, wd, ndim) in FIXTURE["layer_decay"]["params"].items():
        part, _, rest = name.partition(".")
        if part == "backbone":
            p = encoder[our_name(rest)]
            assert ours[id(p)] == pytest.approx((scale, wd)), name
            matched.add(id(p))
        else:
            assert part in ("neck", "decode_head", "auxiliary_head"), name
            heads["official"].add((ndim > 1, scale, wd))
    # Every trained encoder parameter has its official counterpart: no final norm (mmseg's MAE
    # backbone has none; the levels are raw block outputs), a trained 4 x 4 position table.
    assert matched == {id(p) for p in encoder.values()} & set(ours)
    assert {id(p) for p in model.encoder.norm.parameters()}.isdisjoint(ours)
    assert model.encoder.pos_embed.shape == (1, 1 + 16, 8) and id(model.encoder.pos_embed) in ours
    # Heads at lr scale 1, their matrices decayed, their vectors not.
    for module in (model.pyramid, model.head, model.aux):
        heads["ours"] |= {(p.ndim > 1, *ours[id(p)]) for p in module.parameters()}
    assert heads["ours"] == heads["official"]
    assert all(b.ls1.gamma.detach().eq(c["layer_scale"]).all() for b in model.encoder.blocks)
    # mmseg's table: (2 * 4 - 1)^2 patch offsets and 3 cls entries per head, zero at the start.
    assert all(b.attn.table.shape == (7 * 7 + 3, 2) and not b.attn.table.any() for b in model.encoder.blocks)
    assert [b.drop_path1.drop_prob for b in model.encoder.blocks[1:]] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])


def test_the_loss_is_mmsegs_cross_entropy():
    case = FIXTURE["loss"]
    assert FIXTURE["model"]["loss_avg_non_ignore"] is False  # averaged over all pixels
    logits, labels = torch.tensor(case["logits"]), torch.tensor(case["labels"])
    assert seg_loss(logits, labels).item() == pytest.approx(case["loss"], rel=1e-6)


def test_rescale_sizes_are_mmcvs():
    train = {s["type"]: s for s in FIXTURE["train_dataloader"]["pipeline"]}["RandomResize"]
    for case in FIXTURE["resize"]:
        ratio = 1.0 if case["ratio"] is None else case["ratio"]
        assert list(data.rescale_size(*case["size"], tuple(train["scale"]), ratio)) == case["out"], case


class Scripted(random.Random):
    """A Random whose draws are scripted: mmseg's randint(2) coins become random() below or above
    0.5, uniform and randint values are returned as they are."""

    def __init__(self, draws):
        super().__init__(0)
        self.draws = list(draws)

    def _next(self, kind):
        asked, value = self.draws.pop(0)
        assert asked == kind, (asked, kind)
        return value

    def random(self):
        return 0.0 if self._next("randint") else 0.9

    def uniform(self, a, b):
        return self._next("uniform")

    def randrange(self, start, stop=None, step=1):
        return self._next("randint")


def test_photometric_distortion_is_mmsegs():
    p = FIXTURE["photometric"]
    assert p["brightness_delta"] == data.BRIGHTNESS_DELTA and p["hue_delta"] == data.HUE_DELTA
    assert tuple(p["contrast_range"]) == data.CONTRAST_RANGE
    assert tuple(p["saturation_range"]) == data.SATURATION_RANGE
    image = np.array(p["image"], dtype=np.float64)
    for name, case in p["cases"].items():
        rng = Scripted(case["draws"])
        out = data.photometric_distortion(image, rng)
        assert not rng.draws, name  # every draw asked for, in mmseg's order
        official = np.array(case["out"], dtype=np.float64)
        # Equal up to OpenCV's 8-bit HSV round trips (ours are float).
        assert np.abs(out - official).max() <= 2, (name, out.tolist(), case["out"])


def test_random_crop_keeps_the_last_of_its_draws_when_every_crop_fails():
    """A one-class label map fails every cat_max_ratio test: mmseg checks 10 crops and keeps an
    11th. Draw k gives offsets (k, k); the image's first channel holds the row index."""
    official = FIXTURE["crop"]
    size = 40
    rows = np.repeat(np.arange(size, dtype=np.uint8)[:, None], size, 1)
    image = Image.fromarray(np.stack([rows, rows, rows], -1))
    label = np.zeros((size, size), dtype=np.int64)

    class Counting(random.Random):
        calls = 0

        def uniform(self, a, b):
            return 1.0

        def randint(self, a, b):
            self.calls += 1
            return (self.calls + 1) // 2

        def random(self):
            return 0.9  # no flip

    rng = Counting(0)
    p = data.Pipeline(scale=(size, size), crop=4, ratio_range=(1.0, 1.0), photometric=False)
    x, _ = data.train_sample(image, label, p, rng)
    assert rng.calls // 2 == official["draws"] == 11
    mean, std = 255 * IMAGENET_MEAN[0], 255 * IMAGENET_STD[0]
    assert round(x[0, 0, 0].item() * std + mean) == official["kept"] == 11


@pytest.mark.skipif(mmseg_backend.missing_reason() is not None, reason="mmseg is not installed: the fixture stands")
def test_the_fixture_is_the_installed_mmsegs_recipe():
    spec = importlib.util.spec_from_file_location("mmseg_upernet", ROOT / "scripts" / "fixtures" / "mmseg_upernet.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    live = json.loads(json.dumps(generator.collect(generator.installed_config())))
    assert live == FIXTURE
    check_recipe(live, preset())
