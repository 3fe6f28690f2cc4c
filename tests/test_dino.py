"""DINO against its official code (fixtures written by scripts/fixtures/dino_method.py from
facebookresearch/dino): network outputs, the loss, training steps, the augmentations and both
release layouts; then DINO through `bench run`."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TINY
from omegaconf import OmegaConf
from PIL import Image
from test_crash_safety import FAST as CRASH_RUN

from benchmark.core import checkpoint as ckpt
from benchmark.core.transforms import MultiCrop
from benchmark.pretrain import Schedule, set_hyperparameters
from benchmark.step import forward_loss, make_optimizer, update
from methods import build_method
from methods.dino import DINO

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
FIXTURE = torch.load(OFFICIAL / "dino_method.pt", weights_only=False)
ARCH, SCHED = FIXTURE["architecture"], FIXTURE["schedule"]
VARIANTS = {"norm_last_layer": True, "free_last_layer": False}
TOL = dict(rtol=1e-5, atol=1e-5)


def fixture_method(norm_last_layer: bool) -> DINO:
    """Our DINO at the fixture's architecture and recipe, holding the fixture's initial weights."""
    method_cfg = yaml.safe_load((ROOT / "benchmark" / "conf" / "method" / "dino.yaml").read_text())
    del method_cfg["defaults"]
    method_cfg["head"].update(
        out_dim=ARCH["out_dim"],
        hidden_dim=ARCH["hidden_dim"],
        bottleneck_dim=ARCH["bottleneck_dim"],
        norm_last_layer=norm_last_layer,
    )
    method_cfg["local_crops"].update(number=2, size=ARCH["local_size"])
    method_cfg.update(
        warmup_teacher_temp=SCHED["warmup_teacher_temp"],
        teacher_temp=SCHED["teacher_temp"],
        warmup_teacher_temp_epochs=SCHED["warmup_teacher_temp_epochs"],
        momentum_teacher=SCHED["momentum_teacher"],
        freeze_last_layer=SCHED["freeze_last_layer"],
    )
    model_cfg = {k: ARCH[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")}
    method = build_method("dino", dict(model_cfg, mlp_ratio=4.0, drop_path=0.0), method_cfg, ARCH["global_size"])
    return method


def load_initial(method: DINO, initial: dict) -> None:
    backbone = {k.removeprefix("backbone."): v for k, v in initial["student"].items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in initial["student"].items() if k.startswith("head.")}
    for encoder, projector in ((method.encoder, method.head), (method.target_encoder, method.target_head)):
        ckpt.load_weights(encoder, backbone, "fixture backbone")
        ckpt.load_weights(projector, head, "fixture head")
    method.center.copy_(initial["center"])


def split(state: dict) -> tuple[dict, dict]:
    return (
        {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")},
        {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")},
    )


def assert_state(module: torch.nn.Module, expected: dict, what: str) -> None:
    ours = module.state_dict()
    assert set(ours) == set(expected), what
    for key, value in expected.items():
        mine = ours[key]
        if key.endswith("attn.qkv.bias"):
            # The key bias adds the same amount to every logit of a query: its true gradient is 0,
            # the computed one rounding noise that AdamW normalises into steps of up to ~lr / 100
            # which differ between two attention implementations. Checked to that size only.
            width = value.numel() // 3
            torch.testing.assert_close(mine[width : 2 * width], value[width : 2 * width], rtol=0, atol=SCHED["lr"] / 10)
            mine, value = torch.cat([mine[:width], mine[2 * width :]]), torch.cat([value[:width], value[2 * width :]])
        torch.testing.assert_close(mine, value, **TOL, msg=lambda m, key=key: f"{what} {key}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_backbone_head_and_loss_equal_the_official_code(variant):
    data = FIXTURE["variants"][variant]
    method = fixture_method(VARIANTS[variant])
    load_initial(method, data["initial"])
    method.eval()
    crops, out = FIXTURE["crops"][0], data["outputs"]
    with torch.no_grad():
        torch.testing.assert_close(method.encoder.cls_features(torch.cat(crops[:2])), out["backbone_global"], **TOL)
        # Local crops: the position table resampled with the official scale factors.
        torch.testing.assert_close(method.encoder.cls_features(torch.cat(crops[2:])), out["backbone_local"], **TOL)
        student, teacher = method.outputs(crops)
        torch.testing.assert_close(student, out["student"], **TOL)
        torch.testing.assert_close(teacher, out["teacher"], **TOL)
        method.before_step(SCHED["iters_per_epoch"], SCHED["iters_per_epoch"])  # epoch 1, as the fixture's loss
        assert method.teacher_temp(1) == pytest.approx(SCHED["teacher_temp"])
        loss = method.training_step({"crops": crops})["loss"]
    torch.testing.assert_close(loss, out["loss"], **TOL)
    # Centring matters: the same outputs without the centre give another loss.
    method.center.zero_()
    with torch.no_grad():
        assert abs(method.training_step({"crops": crops})["loss"].item() - out["loss"].item()) > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_steps_equal_the_official_loop(variant):
    """Three iterations of main_dino.py's loop: lr warmup reaching its peak then cosine, wd on the
    first group, per-parameter clipping, the last layer frozen in epoch 0, teacher temperature
    warmup, cosine teacher momentum, centre update."""
    data = FIXTURE["variants"][variant]
    method = fixture_method(VARIANTS[variant])
    load_initial(method, data["initial"])
    method.train()
    pre = OmegaConf.load(ROOT / "benchmark" / "conf" / "pretrain" / "cpu.yaml")
    pre = OmegaConf.merge(pre, OmegaConf.load(ROOT / "benchmark" / "conf" / "pretrain" / "dino_cpu.yaml"))
    pre.pop("defaults")
    pre.update(
        lr=SCHED["lr"],
        final_lr=SCHED["min_lr"],
        weight_decay=SCHED["weight_decay"],
        final_weight_decay=SCHED["weight_decay_end"],
        clip_grad=SCHED["clip_grad"],
        warmup_epochs=SCHED["warmup_epochs"],
        fused_adamw=False,
    )
    iters = SCHED["iters_per_epoch"]
    schedule = Schedule(SCHED["epochs"] * iters, SCHED["warmup_epochs"] * iters, iters)
    opt = make_optimizer(method, pre)
    assert len(opt.param_groups) == 2  # the official two: regularised, then not
    losses = []
    for step, crops in enumerate(FIXTURE["crops"]):
        lr, wd = set_hyperparameters(opt, pre, schedule, step)
        assert (lr, wd) == pytest.approx((data["lr"][step], data["wd"][step]), rel=1e-12)
        assert method.teacher_momentum(step / schedule.total_steps) == pytest.approx(data["momentum"][step], rel=1e-12)
        method.before_step(step, iters)
        loss = forward_loss(method.training_step, {"crops": crops}, torch.device("cpu"), False)
        losses.append(loss.item())
        update(method, opt, loss, pre.clip_grad, step / schedule.total_steps)
    assert losses == pytest.approx(data["losses"], rel=1e-5)
    after = data["after"]
    backbone, head = split(after["student"])
    assert_state(method.encoder, backbone, "student backbone")
    assert_state(method.head, head, "student head")
    backbone, head = split(after["teacher"])
    assert_state(method.target_encoder, backbone, "teacher backbone")
    assert_state(method.target_head, head, "teacher head")
    torch.testing.assert_close(method.center, after["center"], **TOL)
    # The prototype layer stayed frozen through epoch 0 and moved in epoch 1.
    initial_v = data["initial"]["student"]["head.last_layer.weight_v"]
    assert not torch.equal(method.head.last_layer.weight_v.detach(), initial_v)


def test_multi_crop_equals_the_official_augmentations():
    aug = FIXTURE["augmentations"]
    image = Image.fromarray(aug["image"].numpy())
    transform = MultiCrop(224, 96, 2, (0.4, 1.0), (0.05, 0.4), (0.1, 2.0))
    for seed, official in aug["draws"].items():
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        views = transform(image)
        assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 2
        for view, expected in zip(views, official):
            torch.testing.assert_close(view[:, ::23, ::23], expected["lattice"], rtol=0, atol=1e-6)
            assert view.double().sum().item() == pytest.approx(expected["sum"], rel=1e-6, abs=1e-3)


def test_release_layouts_load_strictly():
    """The full training checkpoint (argparse.Namespace args included) and the backbone-only file,
    read weights-only, loaded strictly; the teacher backbone equals the fixture's."""
    full = ckpt.load(OFFICIAL / "dino_full_checkpoint.pth")
    assert DINO.official_matches(full)
    method = fixture_method(False)
    found = DINO.official_architecture(full, Path("full.pth"))
    assert found["method.head.out_dim"] == ARCH["out_dim"] and found["method.head.hidden_dim"] == ARCH["hidden_dim"]
    assert found["model.depth"] == ARCH["depth"] and found["model.embed_dim"] == ARCH["embed_dim"]
    method.load_official(full, Path("full.pth"))
    after = FIXTURE["variants"]["free_last_layer"]["after"]
    backbone, head = split(after["teacher"])
    assert_state(method.target_encoder, backbone, "teacher backbone")
    assert_state(method.head, split(after["student"])[1], "student head")
    torch.testing.assert_close(method.center, after["center"])

    backbone_only = ckpt.load(OFFICIAL / "dino_backbone.pth")
    assert DINO.official_matches(backbone_only) and not DINO.official_matches({"model": {}})
    fresh = fixture_method(True)
    fresh.load_official(backbone_only, Path("backbone.pth"))
    assert_state(fresh.target_encoder, backbone, "teacher backbone")
    assert_state(fresh.encoder, backbone, "student backbone")
    broken = dict(backbone_only)
    broken.pop("norm.bias")
    with pytest.raises(Exception, match="norm.bias"):
        fixture_method(True).load_official(broken, Path("backbone.pth"))


FIXTURE_RUN = [
    "method=dino",
    "model=vit_micro",
    f"model.patch_size={ARCH['patch_size']}",
    f"model.embed_dim={ARCH['embed_dim']}",
    f"model.depth={ARCH['depth']}",
    f"model.num_heads={ARCH['num_heads']}",
    f"data.image_size={ARCH['global_size']}",
    f"method.head.out_dim={ARCH['out_dim']}",
    f"method.head.hidden_dim={ARCH['hidden_dim']}",
    f"method.head.bottleneck_dim={ARCH['bottleneck_dim']}",
    "method.head.norm_last_layer=false",
    f"method.local_crops.size={ARCH['local_size']}",
    "method.local_crops.number=2",
    *[o for o in TINY if o.startswith(("data.", "pretrain.", "progress"))],
]


def test_a_bench_checkpoint_exports_to_the_official_layouts(bench, tmp_path):
    """Pretrain through `bench run`, export, and compare with what main_dino.py saves: the same
    keys, shapes and optimizer groups; the export loads back and evaluates as the run did."""
    # Two epochs, as the fixture's: the prototype layer, frozen in the first, has optimizer state.
    bench("run", *FIXTURE_RUN, "pretrain.epochs=2", "task=none", "run_dir=run", check=0)
    bench("export", "run/checkpoints/last.pt", "full.pth", check=0)
    bench("export", "run/checkpoints/last.pt", "backbone.pth", "--encoder-only", check=0)
    ours, official = ckpt.load(tmp_path / "full.pth"), ckpt.load(OFFICIAL / "dino_full_checkpoint.pth")
    assert set(ours) == set(official)
    for part in ("student", "teacher"):
        assert {k: tuple(v.shape) for k, v in ours[part].items()} == {
            k: tuple(v.shape) for k, v in official[part].items()
        }, part
    assert ours["dino_loss"]["center"].shape == official["dino_loss"]["center"].shape
    assert [len(g["params"]) for g in ours["optimizer"]["param_groups"]] == [
        len(g["params"]) for g in official["optimizer"]["param_groups"]
    ]
    assert set(ours["optimizer"]["state"]) == set(official["optimizer"]["state"])
    for index, state in official["optimizer"]["state"].items():
        assert ours["optimizer"]["state"][index]["exp_avg"].shape == state["exp_avg"].shape, index
    assert ours["args"].out_dim == official["args"].out_dim and ours["epoch"] == 2
    backbone = ckpt.load(tmp_path / "backbone.pth")
    assert set(backbone) == set(ckpt.load(OFFICIAL / "dino_backbone.pth"))
    torch.testing.assert_close(backbone["pos_embed"], ours["teacher"]["backbone.pos_embed"])
    # Both exports evaluate exactly like the run's own checkpoint (the teacher backbone).
    knn = [*FIXTURE_RUN, "task=knn", "tasks.knn.ks=[5]", "tasks.knn.k=5"]
    tops = []
    for checkpoint, name in (("run/checkpoints/last.pt", "a"), ("full.pth", "b"), ("backbone.pth", "c")):
        bench("run", *knn, f"checkpoint={checkpoint}", f"run_dir={name}", check=0)
        tops.append(json.loads((tmp_path / name / "records" / "knn.json").read_text())["metrics"]["top1"])
    assert tops[0] == tops[1] == tops[2]


# 32 images of 32 px, batch 8: 4 steps per epoch, 8 in all; the checkpoint after step 3 sits in
# the epoch whose last layer is frozen, the resumed steps run in the next.
KILL_RUN = [
    "method=dino",
    # The crash-safety run (its model, data and schedule) without its method and task settings.
    *(o for o in CRASH_RUN if not o.startswith(("method.", "task"))),
    "method.head.out_dim=32",
    "method.head.hidden_dim=32",
    "method.local_crops.size=16",
    "method.local_crops.number=2",
    "task=none",
]


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, cache_dir):
    """The teacher, the centre and the epoch-dependent settings survive a kill mid-run."""
    import os
    import subprocess
    import sys

    def run(folder: str, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, BENCH_CACHE=str(cache_dir), BENCH_FAULT_SIGNAL="KILL")
        env.pop("BENCH_FAULT", None)
        if fault:
            env["BENCH_FAULT"] = fault
        command = [sys.executable, "-m", "benchmark.cli", "run", *KILL_RUN, f"run_dir={folder}", *extra]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    assert run("straight").returncode == 0
    killed = run("killed", fault="step:5")
    assert killed.returncode == -9, killed.stderr
    assert ckpt.load(tmp_path / "killed" / "checkpoints" / "last.pt")["step"] == 3
    resumed = run("killed", "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    straight = ckpt.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    got = ckpt.load(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert got["step"] == straight["step"] == 8
    for key, value in straight["method"]["weights"].items():
        assert torch.equal(got["method"]["weights"][key], value), key
    assert straight["method"]["weights"]["center"].abs().sum() > 0
    log = (tmp_path / "straight" / "train_log.jsonl").read_text()
    assert (tmp_path / "killed" / "train_log.jsonl").read_text() == log
