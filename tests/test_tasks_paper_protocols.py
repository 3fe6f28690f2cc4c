"""The paper-scale protocols' code paths, run for real on tiny generated data: MAE's streaming
linear probe (LARS, BatchNorm head, cls or mean pooling) and MAE's finetuning recipe
(RandAugment, random erasing, timm mixup/cutmix, fp16 with a loss scale, a trained position
table, no final norm before the head). Their settings against the official code are checked in
tests/test_official_mae_recipes.py."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from tasks_helpers import OVERRIDES, SIZE, context, snapshot, tiny_data

from benchmark.config import load_config
from benchmark.core import synthetic
from benchmark.core.data import DataSource
from benchmark.core.errors import ConfigError
from benchmark.core.loading import eval_loader
from methods import build_method
from tasks import build_task

# The task tests' tiny model, for any method (the IWM-only mask setting is added per method).
TINY = [o for o in OVERRIDES if not o.startswith(("method=", "task=", "method.mask."))]


def setup(method_name: str, *overrides: str):
    extra = ["method.mask.min_keep=0"] if method_name == "iwm" else []
    cfg = OmegaConf.to_container(
        load_config([f"method={method_name}", "task=paper", *TINY, *extra, *overrides]), resolve=True
    )
    torch.manual_seed(0)
    return cfg, build_method(method_name, cfg["model"], cfg["method"], SIZE).eval()


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    # Version-3 data: its 6 colour classes are within reach of a random 32 px encoder's probe.
    root = synthetic.generate(tmp_path_factory.mktemp("probe") / "data", 192, 64, SIZE, seed=1, version=3)
    return DataSource("shapes", root, "train", "val", SIZE, root / "labels.csv", "colour")


@pytest.mark.parametrize(
    "method_name, pool, precision, floor", [("mae", "cls", "fp32", 20.0), ("iwm", "mean", "bf16", 25.0)]
)
def test_streaming_linear_probe_learns_the_colour_label_with_the_methods_own_pooling(
    tmp_path, probe_data, method_name, pool, precision, floor
):
    cfg, method = setup(method_name)
    # A large base lr: LARS moves each matrix by lr x 0.001 of its norm per step, and this probe
    # has 60 steps where ImageNet's has 7,000.
    task_cfg = dict(cfg["tasks"]["linear"], epochs=10, batch_size=32, warmup_epochs=1, blr=40.0, precision=precision)
    task = build_task("linear", task_cfg)
    task.check(method)
    before = snapshot(method)
    ctx = context(probe_data, tmp_path)
    ctx.encoder_key = method.default_encoder_key
    record = task.run(method, ctx)
    assert record["protocol"] == "streaming" and record["pool"] == pool
    assert record["steps"] == 10 * (192 // 32) and record["lr"] == pytest.approx(40.0 * 32 / 256)
    # 6 colour classes (chance 16.7 %) on a random 32 px encoder, whose cached mean-token grid
    # reaches about 40 % here; a random cls token carries less of the colour. Measured: MAE cls
    # 23.4 %, IWM mean 28.1 %, each training loss down by more than 0.1.
    assert record["top1"] >= floor and record["final_loss"] < record["first_loss"] - 0.08
    assert record["val_samples"] == 64 and len(record["evidence"].arrays["correct"]) == 64
    # The encoder is frozen: nothing of the method moved.
    after = snapshot(method)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cls_pooling_is_refused_for_a_method_without_a_cls_token():
    cfg, iwm = setup("iwm")
    with pytest.raises(ConfigError, match="tasks.linear.pool=cls: method iwm has no cls feature"):
        build_task("linear", dict(cfg["tasks"]["linear"], pool="cls")).check(iwm)
    with pytest.raises(ConfigError, match="tasks.knn.pool=cls: method iwm has no cls feature"):
        build_task("knn", dict(cfg["tasks"]["knn"], pool="cls")).check(iwm)


def test_the_shared_feature_cache_pools_the_cls_token_when_asked(probe_data, tmp_path):
    """The grid probe and k-NN read `pool` from one cache: the cls features are the method's own
    `probe_features`, the mean ones the patch tokens' mean; each extracted once per split."""
    _, mae = setup("mae")
    ctx = dataclasses.replace(context(probe_data, tmp_path), encoder_key="encoder")
    cls, labels = ctx.pooled_features(mae, "val", "cls")
    mean, same_labels = ctx.pooled_features(mae, "val", "mean")
    assert cls.shape == mean.shape == (64, mae.token_dim) and torch.equal(labels, same_labels)
    assert not torch.allclose(cls, mean)
    assert ctx.pooled_features(mae, "val", "cls")[0] is cls  # computed once
    batch = next(iter(eval_loader(probe_data.split("val"), SIZE, 16, 0)))
    with torch.no_grad():
        direct = mae.probe_features(batch["images"], "encoder", "cls")
    torch.testing.assert_close(cls[:16], direct, rtol=1e-5, atol=1e-5)


def test_mae_cls_and_mean_probe_features_differ_and_have_the_token_width():
    _, mae = setup("mae")
    images = torch.randn(2, 3, SIZE, SIZE)
    cls = mae.probe_features(images, "encoder", "cls")
    mean = mae.probe_features(images, "encoder", "mean")
    assert cls.shape == mean.shape == (2, 48) and not torch.allclose(cls, mean)
    assert torch.allclose(mean, mae.eval_encoder("encoder")(images).mean(1))


def test_mae_finetuning_recipe_trains_the_position_table_under_fp16_with_every_augmentation(tmp_path):
    cfg, method = setup("mae")
    task_cfg = dict(cfg["tasks"]["encoder_ft"], epochs=2, batch_size=8, warmup_epochs=0.5)
    assert task_cfg["auto_augment"] and task_cfg["reprob"] and task_cfg["mixup"] and task_cfg["cutmix"]
    assert task_cfg["precision"] == "fp16" and task_cfg["train_pos_embed"] and not task_cfg["final_norm"]
    task = build_task("encoder_ft", task_cfg)
    task.check(method)
    pos_before = method.encoder.pos_embed.detach().clone()
    ctx = context(tiny_data(tmp_path / "data"), tmp_path)
    ctx.encoder_key = "encoder"
    record, model = task.tune(method, ctx)
    assert record["steps"] == 2 * (32 // 8) and 0.0 <= record["top1"] <= 100.0
    assert all(torch.isfinite(torch.tensor(record["loss_curve"])))
    # The working copy's table was trained; the run's method kept its fixed one.
    assert not torch.allclose(model.encoder.pos_embed, pos_before)
    assert torch.equal(method.encoder.pos_embed, pos_before) and not method.encoder.pos_embed.requires_grad
    assert isinstance(model.encoder.norm, torch.nn.Identity) and not isinstance(method.encoder.norm, torch.nn.Identity)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"batch_size": 7}, "need an even batch"),
        ({"final_norm": False, "head": "attentive"}, None),
    ],
)
def test_bad_finetuning_recipe_settings_fail_before_compute(override, message):
    """(A policy timm cannot parse is refused with the settings: tests/test_bad_input.py.)"""
    cfg, method = setup("mae")
    task = build_task("encoder_ft", dict(cfg["tasks"]["encoder_ft"], **override))
    if message is None:
        task.check(method)  # no final norm with an attentive head on the tokens is a valid choice
        return
    with pytest.raises(ConfigError, match=message):
        task.check(method)


def test_end_to_end_refuses_to_drop_the_norm_the_predictor_reads():
    cfg, method = setup("mae")
    task = build_task("end_to_end", dict(cfg["tasks"]["end_to_end"], final_norm=False))
    with pytest.raises(ConfigError, match="final_norm=false"):
        task.check(method)


@pytest.mark.parametrize("name", ["attentive", "predictor_ft"])
def test_frozen_encoder_tasks_stream_augmented_images_and_leave_the_encoder_alone(tmp_path, name):
    """V-JEPA's attentive recipe (AutoAugment, erasing, fp16, clipping, a cosine weight decay) and
    the paper's predictor finetuning read images through the frozen encoder at every step."""
    cfg, method = setup("iwm")
    task_cfg = dict(cfg["tasks"][name], epochs=2, batch_size=8, head_heads=3)
    assert task_cfg["inputs"] == "images" and task_cfg["auto_augment"] and task_cfg["reprob"]
    task = build_task(name, task_cfg)
    task.check(method)
    encoder_before = snapshot(method.target_encoder)
    ctx = context(tiny_data(tmp_path / "data"), tmp_path)
    record, model = task.tune(method, ctx)
    assert record["inputs"] == "images" and record["encoder"] == "frozen"
    assert record["steps"] == 2 * (32 // 8) and all(torch.isfinite(torch.tensor(record["loss_curve"])))
    assert all(torch.equal(v, method.target_encoder.state_dict()[k]) for k, v in encoder_before.items())
    # Only the head (and, for predictor_ft, the predictor copy) had gradients.
    assert model.encoder is method.target_encoder
    assert all(p.grad is None for p in method.target_encoder.parameters())


def test_a_trained_encoder_needs_image_inputs():
    cfg, method = setup("iwm")
    with pytest.raises(ConfigError, match="a trained encoder reads images"):
        build_task("encoder_ft", dict(cfg["tasks"]["encoder_ft"], inputs="tokens")).check(method)


def test_the_weight_decay_schedule_reaches_its_final_value_on_decayed_groups_only():
    from benchmark.core.optim import param_groups
    from tasks.core import train

    layer = torch.nn.Linear(4, 3)
    groups = param_groups(layer, 0.5)
    seen = []

    def loss(_):
        seen.append({g["apply_wd"]: g["weight_decay"] for g in opt_groups})
        return layer(torch.ones(1, 4)).sum()

    opt_groups = []

    def adamw(gs):
        opt = torch.optim.AdamW(gs, lr=0.0)
        opt_groups.extend(opt.param_groups)
        return opt

    train(
        groups,
        range(5),
        5,
        lambda s: 0.1,
        loss,
        betas=(0.9, 0.999),
        clip_grad=0.0,
        device=torch.device("cpu"),
        precision="fp32",
        label="wd",
        optimizer=adamw,
        wd_at=lambda s: 0.5 - 0.1 * s,
    )
    assert [s[True] for s in seen] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1]) and {s[False] for s in seen} == {0.0}
