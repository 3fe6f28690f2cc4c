"""The paper-scale linear probe and encoder finetuning against the official MAE code.

The fixture tests/fixtures/official/mae_recipes.pt was generated from facebookresearch/mae by
scripts/fixtures/mae_recipes.py (see its docstring): optimiser steps, schedules, transforms and
parameter groups computed by the official code, compared here with what `task=paper` runs.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from benchmark.config import load_config
from benchmark.core.loading import Transformed
from benchmark.core.optim import LARS
from benchmark.core.schedules import warmup_cosine
from benchmark.core.transforms import eval_transform, probe_transform, recipe_transform
from tasks.core import train
from tasks.linear import BatchNormLinear

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "official" / "mae_recipes.pt")


def paper(method: str, *overrides: str) -> dict:
    return OmegaConf.to_container(load_config([f"method={method}", "task=paper", *overrides]), resolve=True)


def test_paper_linear_probe_settings_are_main_linprobe_with_the_vit_b_command():
    official = FIXTURE["args"]["linprobe"]
    ours = paper("mae")["tasks"]["linear"]
    assert ours["protocol"] == "streaming"
    assert ours["batch_size"] == official["batch_size"] and ours["epochs"] == official["epochs"]
    assert ours["blr"] == official["blr"] and ours["min_lr"] == official["min_lr"]
    assert ours["warmup_epochs"] == official["warmup_epochs"] and ours["weight_decay"] == official["weight_decay"]
    assert (ours["momentum"], ours["trust_coefficient"]) == (0.9, 0.001)  # util/lars.py's defaults
    assert ours["head_init_std"] == 0.01 and ours["crop_scale"] == [0.08, 1.0]
    assert ours["precision"] == "fp16"  # torch.cuda.amp.autocast + loss scaler
    # --cls_token for MAE; the pooled patch tokens for the JEPAs (no cls token to read).
    assert ours["pool"] == "method" and not official["global_pool"]
    from methods import METHODS

    assert METHODS["mae"].probe_pool == "cls" and METHODS["ijepa"].probe_pool == "mean"


def test_lars_head_steps_equal_the_official_ones():
    """Our LARS, BatchNorm head and warmup + half-cosine schedule, through the protocol core's
    training loop, take the official twelve steps."""
    f = FIXTURE["lars"]
    head = BatchNormLinear(24, 5)
    # The official head is Sequential(BatchNorm1d, Linear): keys 0.* and 1.*.
    names = {"0": "norm", "1": "linear"}
    official_keys = {k: names[k.split(".")[0]] + k[1:] for k in f["before"]}
    head.load_state_dict({official_keys[k]: v for k, v in f["before"].items()})
    x, y, batch = f["features"], f["labels"], f["batch"]
    steps_per_epoch = len(x) // batch
    total, warmup = f["epochs"] * steps_per_epoch, f["warmup_epochs"] * steps_per_epoch
    batches = [order[i * batch : (i + 1) * batch] for order in f["orders"] for i in range(steps_per_epoch)]
    lrs = []

    def lr_at(step):
        lrs.append(warmup_cosine(step, total, warmup, 0.0, f["peak_lr"], 0.0))
        return lrs[-1]

    head.train()
    losses = train(
        [{"params": list(head.parameters()), "lr_scale": 1.0}],
        batches,
        total,
        lr_at,
        lambda idx: F.cross_entropy(head(x[idx]), y[idx]),
        betas=None,
        clip_grad=0.0,
        device=torch.device("cpu"),
        precision="fp32",
        label="probe",
        optimizer=lambda groups: LARS(groups, weight_decay=f["weight_decay"]),
    )
    assert lrs == pytest.approx(f["lrs"], abs=1e-12)
    assert losses == pytest.approx(f["losses"], abs=1e-5)
    after = f["after"]
    assert torch.allclose(head.linear.weight, after["1.weight"], atol=1e-6)
    assert torch.allclose(head.linear.bias, after["1.bias"], atol=1e-6)
    assert torch.allclose(head.norm.running_mean, after["0.running_mean"], atol=1e-6)
    assert torch.allclose(head.norm.running_var, after["0.running_var"], atol=1e-5)
    # The steps moved the head: equality above is not that of two untouched heads.
    # (LARS steps are small: trust 0.001 of the weight norm.)
    assert (f["before"]["1.weight"] - after["1.weight"]).abs().max().item() > 20 * 1e-6


def test_lars_leaves_biases_unscaled_and_undecayed():
    weight = torch.nn.Parameter(torch.ones(2, 2))
    bias = torch.nn.Parameter(torch.ones(2))
    opt = LARS([weight, bias], lr=1.0, weight_decay=0.5, momentum=0.0, trust_coefficient=0.1)
    weight.grad, bias.grad = torch.full((2, 2), 1.0), torch.full((2,), 1.0)
    opt.step()
    # Matrix: (g + wd w) = 1.5 each, scaled to 0.1 * |w| / |g'| = 0.1 * 2 / 3 -> step 0.1 each.
    assert torch.allclose(weight, torch.full((2, 2), 0.9))
    assert torch.allclose(bias, torch.zeros(2))


def test_probe_head_is_batchnorm_without_affine_then_linear_with_small_init():
    torch.manual_seed(0)
    head = BatchNormLinear(256, 100)
    assert not head.norm.affine and head.norm.eps == 1e-6
    assert head.linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.equal(head.linear.bias, torch.zeros(100))


def test_probe_crop_equals_the_official_linear_probe_transform():
    f = FIXTURE["probe_crops"]
    image = Image.fromarray(f["image"].numpy())
    transform = probe_transform(f["size"], paper("mae")["tasks"]["linear"]["crop_scale"])
    for seed, expected in enumerate(f["outputs"]):
        torch.manual_seed(seed)
        assert torch.allclose(transform(image), expected, atol=1e-6), f"seed {seed}"


def test_finetune_transform_equals_the_official_pipeline_on_a_fixed_image():
    f = FIXTURE["finetune_transform"]
    cfg = paper("mae")["tasks"]["encoder_ft"]
    transform = recipe_transform(
        f["size"],
        cfg["crop_scale"],
        cfg["flip"],
        cfg["auto_augment"],
        cfg["reprob"],
        cfg["remode"],
        cfg["recount"],
    )
    assert repr(transform) == f["train_repr"]
    image = Image.fromarray(f["image"].numpy())

    class One:
        def __getitem__(self, index):
            return image, 0

        def __len__(self):
            return 1

    # Through the loader's seeding (data.Transformed): each of torch, random and numpy seeded
    # with the sample seed, as the fixture seeded them.
    dataset = Transformed(One(), transform)
    for seed, expected in enumerate(f["outputs"]):
        view, _, _ = dataset[(0, seed, 0)]
        assert torch.allclose(view, expected, atol=1e-6), f"seed {seed}"
    assert torch.allclose(eval_transform(f["size"])(image), f["val_output"], atol=1e-6)


def test_paper_encoder_finetuning_settings_are_main_finetune_with_the_vit_b_command():
    official = FIXTURE["args"]["finetune"]
    ours = paper("mae")["tasks"]["encoder_ft"]
    assert ours["batch_size"] == official["batch_size"] and ours["epochs"] == official["epochs"]
    assert ours["lr"] == pytest.approx(official["blr"] * official["batch_size"] / 256)
    assert ours["min_lr"] == official["min_lr"] and ours["warmup_epochs"] == official["warmup_epochs"]
    assert ours["weight_decay"] == official["weight_decay"] and ours["layer_decay"] == official["layer_decay"]
    assert ours["drop_path"] == official["drop_path"] and ours["label_smoothing"] == official["smoothing"]
    assert (ours["mixup"], ours["cutmix"]) == (official["mixup"], official["cutmix"])
    assert (ours["mix_prob"], ours["switch_prob"]) == (official["mixup_prob"], official["mixup_switch_prob"])
    assert ours["auto_augment"] == official["aa"] and ours["reprob"] == official["reprob"]
    assert (ours["remode"], ours["recount"]) == (official["remode"], official["recount"])
    assert official["clip_grad"] is None and ours["clip_grad"] == 0.0
    assert official["global_pool"] and ours["head"] == "pooled" and not ours["final_norm"]
    assert ours["betas"] == [0.9, 0.999]  # torch.optim.AdamW's defaults, which MAE keeps
    assert ours["precision"] == "fp16" and ours["train_pos_embed"] and ours["head_init_std"] == 2e-5


def test_finetune_lr_schedule_equals_the_official_one():
    from tasks.recipe import lr_schedule

    f = FIXTURE["schedule"]
    cfg = paper("mae")["tasks"]["encoder_ft"]
    _, lr_at = lr_schedule(cfg, f["steps_per_epoch"])
    assert [lr_at(s) for s in f["steps"]] == pytest.approx(f["lrs"], rel=1e-9, abs=1e-15)


def test_paper_encoder_finetuning_groups_equal_the_official_ones_pos_embed_included(tmp_path):
    """Which parameters train, each one's lr scale and weight decay, the model's norms and the
    head's initialisation: as util/lr_decay.py and main_finetune.py set them up."""
    from methods import build_method
    from tasks import build_task
    from tasks.base import TaskContext

    f = FIXTURE["groups"]
    arch = f["architecture"]
    cfg = paper(
        "mae",
        f"model.patch_size={arch['patch_size']}",
        f"model.embed_dim={arch['embed_dim']}",
        f"model.num_heads={arch['num_heads']}",
        f"model.depth={arch['depth']}",
        "method.predictor.depth=1",
        "method.predictor.width=24",
        f"data.image_size={arch['img_size']}",
    )
    method = build_method("mae", cfg["model"], cfg["method"], arch["img_size"])
    ctx = TaskContext(source=None, device=torch.device("cpu"), encoder_key="encoder", seed=0, run_dir=tmp_path)
    task = build_task("encoder_ft", cfg["tasks"]["encoder_ft"])
    task.check(method)
    model, groups, _ = task.build(method, ctx, 5, seed=0)
    ours = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = {**dict(model.encoder.named_parameters())}
    named |= {"fc_norm." + n: p for n, p in model.head.norm.named_parameters()}
    named |= {"head." + n: p for n, p in model.head.linear.named_parameters()}
    assert set(f["per_name"]) == {n for n, p in named.items() if id(p) in ours}
    assert len(ours) == len(f["per_name"])
    for name, (scale, wd) in f["per_name"].items():
        assert ours[id(named[name])] == pytest.approx((scale, wd)), name
    # The global-pool model has no final norm before the head (one norm: fc_norm).
    assert not f["has_norm"] and not any(n.startswith("norm.") for n in named)
    assert isinstance(model.encoder.norm, torch.nn.Identity)
    weight = model.head.linear.weight
    assert weight.std().item() == pytest.approx(f["head_weight"].std().item(), rel=0.5)
    assert torch.equal(model.head.linear.bias, f["head_bias"])
