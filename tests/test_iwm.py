import json

import torch
from conftest import TINY
from omegaconf import OmegaConf

from benchmark.config import load_config
from benchmark.core.views import ACTION_DIM
from methods import build_method


def tiny_cfg(*overrides):
    cfg = load_config(
        [
            "method=iwm",
            "model.depth=2",
            "model.patch_size=4",
            "method.predictor.depth=1",
            "method.predictor.width=48",
            "data.image_size=32",
            *overrides,
        ]
    )
    return OmegaConf.to_container(cfg, resolve=True)


def batch(method, target, source, action):
    ctx_idx, tgt_idx = method.masker.sample(target.size(0), torch.Generator().manual_seed(0))
    return {
        "target": target,
        "source": source,
        "action": action,
        "ctx_idx": ctx_idx,
        "tgt_idx": tgt_idx,
        "labels": torch.zeros(target.size(0), dtype=torch.long),
    }


def test_unconditioned_iwm_on_identical_views_is_ijepa():
    cfg = tiny_cfg("method.predictor.conditioning=none")
    torch.manual_seed(0)
    iwm = build_method("iwm", cfg["model"], cfg["method"], 32)
    ijepa_cfg = dict(cfg["method"], crop_scale=[0.3, 1.0])
    ijepa = build_method("ijepa", cfg["model"], ijepa_cfg, 32)
    ijepa.load_state_dict(iwm.state_dict())
    images = torch.randn(3, 3, 32, 32)
    b = batch(iwm, images, images, torch.zeros(3, ACTION_DIM))
    with torch.no_grad():
        a = iwm.training_step(b)["loss"]
        c = ijepa.training_step({"images": images, "ctx_idx": b["ctx_idx"], "tgt_idx": b["tgt_idx"]})["loss"]
    assert torch.equal(a, c)


def test_iwm_step_reads_the_target_view_for_targets_and_the_action_in_the_predictor():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    iwm = build_method("iwm", cfg["model"], cfg["method"], 32)
    src, tgt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    act = torch.zeros(2, ACTION_DIM)
    moved = act.clone()
    moved[:, 0] = 0.3
    with torch.no_grad():
        base = iwm.training_step(batch(iwm, tgt, src, act))["loss"]
        other_target = iwm.training_step(batch(iwm, tgt.flip(-1), src, act))["loss"]
        other_action = iwm.training_step(batch(iwm, tgt, src, moved))["loss"]
    assert base != other_target and base != other_action
    assert iwm.predictor.conditioning == "feature" and iwm.method_cfg["loss"] == "l2"


def test_collate_builds_paired_batches_from_real_views():
    cfg = tiny_cfg()
    iwm = build_method("iwm", cfg["model"], cfg["method"], 32)
    from PIL import Image

    img = Image.new("RGB", (50, 40), (200, 30, 60))
    torch.manual_seed(0)
    items = [(iwm.train_transform()(img), 1, 123), (iwm.train_transform()(img), 2, 123)]
    b = iwm.collate(items)
    assert b["target"].shape == b["source"].shape == (2, 3, 32, 32)
    assert b["action"].shape == (2, ACTION_DIM) and len(b["tgt_idx"]) == 4
    loss = iwm.training_step(b)["loss"]
    loss.backward()
    assert iwm.predictor.action_mixer[0].weight.grad.abs().sum() > 0


def test_bench_run_iwm_end_to_end(bench, tmp_path):
    proc = bench("run", "method=iwm_inv_cpu", "run_dir=results/iwm", *TINY, check=0)
    rec = json.loads((tmp_path / "results/iwm/records/linear.json").read_text())
    assert rec["method"] == "iwm" and rec["preset"] == "iwm_inv_cpu"
    assert rec["config"]["method"]["predictor"]["depth"] == 1 and "linear" in proc.stdout
