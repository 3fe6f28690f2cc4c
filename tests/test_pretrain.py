import json

import pytest
import torch
from omegaconf import OmegaConf

from benchmark.config import load_config
from benchmark.core import checkpoint as ckpt
from benchmark.core import synthetic
from benchmark.core.data import DataSource
from benchmark.core.errors import DivergenceError
from benchmark.pretrain import pretrain
from methods import build_method, method_from_state


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("gen") / "shapes", 48, 16, 32, seed=2)
    return DataSource("shapes", root, "train", "val", 32)


def tiny(method="ijepa", **pretrain_overrides):
    cfg = load_config(
        [
            f"method={method}",
            "model.depth=2",
            "model.patch_size=4",
            "method.predictor.depth=1",
            "method.predictor.width=48",
            "data.image_size=32",
            "pretrain.batch_size=8",
            "pretrain.epochs=2",
            "pretrain.warmup_epochs=1",
            "pretrain.bf16=false",
            "pretrain.log_every=1",
            "pretrain.checkpoint_every=0",
        ]
    )
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg["pretrain"].update(pretrain_overrides)
    return cfg


def fresh(cfg):
    torch.manual_seed(0)
    return build_method("ijepa", cfg["model"], cfg["method"], 32)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "train_log.jsonl")]


def test_training_changes_weights_and_ema_follows(source, tmp_path):
    cfg = tiny()
    method = fresh(cfg)
    enc0 = [p.detach().clone() for p in method.encoder.parameters()]
    tgt0 = [p.detach().clone() for p in method.target_encoder.parameters()]
    out = pretrain(
        method,
        source,
        OmegaConf.create(cfg["pretrain"]),
        0,
        torch.device("cpu"),
        tmp_path / "ckpt",
        cfg,
        show_progress=False,
    )
    assert out["steps"] == 12 and out["total_steps"] == 12
    moved_online = sum((p - q).abs().sum().item() for p, q in zip(method.encoder.parameters(), enc0))
    moved_target = sum((p - q).abs().sum().item() for p, q in zip(method.target_encoder.parameters(), tgt0))
    assert moved_online > 0 and 0 < moved_target < moved_online  # EMA lags behind
    assert all(not p.requires_grad for p in method.target_encoder.parameters())


def test_resume_reaches_the_same_losses_and_weights(source, tmp_path):
    cfg = tiny()
    pcfg = OmegaConf.create(cfg["pretrain"])
    straight = fresh(cfg)
    pretrain(straight, source, pcfg, 0, torch.device("cpu"), tmp_path / "a" / "ckpt", cfg, show_progress=False)

    first = fresh(cfg)
    pretrain(
        first, source, pcfg, 0, torch.device("cpu"), tmp_path / "b" / "ckpt", cfg, show_progress=False, max_steps=5
    )
    state = ckpt.load(tmp_path / "b" / "ckpt" / "last.pt")
    assert state["step"] == 5 and state["config"]["pretrain"]["epochs"] == 2
    assert {"optimizer", "rng", "method", "total_steps"} <= set(state)
    resumed = fresh(cfg)  # new process, new init: everything must come from the checkpoint
    pretrain(resumed, source, pcfg, 0, torch.device("cpu"), tmp_path / "b" / "ckpt", cfg, show_progress=False)

    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=0, rel=0)
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)


def test_resuming_from_another_method_s_checkpoint_names_both_methods(source, tmp_path):
    """An I-JEPA last.pt in an IWM run folder: refused naming whose it is, before any step."""
    cfg = tiny(epochs=1)
    pcfg = OmegaConf.create(cfg["pretrain"])
    pretrain(fresh(cfg), source, pcfg, 0, torch.device("cpu"), tmp_path / "ckpt", cfg, show_progress=False)
    iwm_cfg = tiny("iwm")
    iwm = build_method("iwm", iwm_cfg["model"], iwm_cfg["method"], 32)
    lines = (tmp_path / "train_log.jsonl").read_text()
    with pytest.raises(
        ckpt.CheckpointError, match="written by a method=ijepa run, not this method=iwm run: resume that run"
    ):
        pretrain(iwm, source, pcfg, 0, torch.device("cpu"), tmp_path / "ckpt", cfg, show_progress=False)
    assert (tmp_path / "train_log.jsonl").read_text() == lines  # nothing of the run it belongs to is lost


def test_checkpoint_round_trip_rebuilds_the_method(source, tmp_path):
    cfg = tiny(epochs=1)
    method = fresh(cfg)
    pretrain(
        method, source, OmegaConf.create(cfg["pretrain"]), 0, torch.device("cpu"), tmp_path, cfg, show_progress=False
    )
    state = ckpt.load(tmp_path / "last.pt")
    loaded = method_from_state(state["method"])
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.target_encoder(x), method.target_encoder(x))

    state["method"]["weights"]["encoder.norm.weight"] = torch.zeros(7)
    with pytest.raises(ckpt.CheckpointError, match="mis-shaped.*encoder.norm.weight"):
        method_from_state(state["method"])
    del state["method"]["weights"]["encoder.norm.weight"]
    with pytest.raises(ckpt.CheckpointError, match="missing.*encoder.norm.weight"):
        method_from_state(state["method"])


def test_non_finite_loss_stops_with_the_step(source, tmp_path):
    cfg = tiny(lr=1e30, start_lr=1e30, epochs=2)
    with pytest.raises(DivergenceError, match="at step"):
        pretrain(
            fresh(cfg),
            source,
            OmegaConf.create(cfg["pretrain"]),
            0,
            torch.device("cpu"),
            tmp_path,
            cfg,
            show_progress=False,
        )


def test_loading_refuses_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load(path)
