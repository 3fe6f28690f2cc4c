"""Released I-JEPA and MAE layouts, built at tiny size with timm as the independent reference."""

import json

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT

from benchmark.config import load_config
from benchmark.core import checkpoint as ckpt
from benchmark.official import method_from_official, to_official
from benchmark.step import make_optimizer
from methods import build_method
from methods.mae import MAEDecoder
from methods.vit import Predictor

# The TINY model: vit_micro at depth 2 (192 wide, 3 heads, patch 8), predictor 1 x 48, 64 px.
DIM, DEPTH, HEADS, PATCH, WIDTH, PDEPTH = 192, 2, 3, 8, 48, 1
CFG = ["model=vit_micro", f"model.depth={DEPTH}", f"method.predictor.depth={PDEPTH}", f"method.predictor.width={WIDTH}"]
MAE_CFG = [*CFG, "method=mae"]
IJEPA_CFG = [*CFG, "method=ijepa"]


def timm_vit(img: int, cls: bool) -> TimmViT:
    """The reference encoder: timm's ViT with (MAE) or without (I-JEPA) a class token."""
    return TimmViT(
        img_size=img,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        class_token=cls,
        global_pool="token" if cls else "avg",
        fc_norm=False,
        num_classes=0,
    ).eval()


def randomized(module: torch.nn.Module, seed: int) -> dict:
    """Its state dict with every tensor moved off its initial value (LayerNorms included)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in module.state_dict().items()}


def ijepa_file(path, img=64, predictor=None):
    parts = {
        "encoder": randomized(timm_vit(img, False), 1),
        "target_encoder": randomized(timm_vit(img, False), 2),
        "predictor": predictor
        or randomized(Predictor((img // PATCH) ** 2, img // PATCH, DIM, WIDTH, PDEPTH, HEADS), 3),
    }
    state = {part: {f"module.{k}": v for k, v in sd.items()} for part, sd in parts.items()}
    state.update(
        opt={"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        scaler=None,
        epoch=300,
        loss=0.17,
        batch_size=2048,
        world_size=16,
        lr=1e-3,
    )
    torch.save(state, path)
    return parts


def mae_file(path, img=64, decoder=True, edit=None):
    weights = randomized(timm_vit(img, True), 4)
    if decoder:
        weights.update(randomized(MAEDecoder(img // PATCH, DIM, WIDTH, PDEPTH, 4, 4.0, PATCH), 5))
    if edit:
        edit(weights)
    torch.save({"model": weights}, path)
    return weights


def load(path, overrides):
    return method_from_official(ckpt.load(path), path, load_config(overrides))


def reference_tokens(weights: dict, img: int, cls: bool, x: torch.Tensor, file_grid: int) -> torch.Tensor:
    ref = timm_vit(img, cls)
    enc = {k: v for k, v in weights.items() if not k.startswith(("decoder_", "mask_token"))}
    if file_grid != img // PATCH:
        enc["pos_embed"] = resample_abs_pos_embed(
            enc["pos_embed"],
            new_size=(img // PATCH,) * 2,
            num_prefix_tokens=int(cls),
            interpolation="bicubic",
            antialias=False,
        )
    ref.load_state_dict(enc, strict=True)
    with torch.no_grad():
        return ref.forward_features(x)


@pytest.mark.parametrize("file_img", [64, 32])
def test_ijepa_file_gives_timms_outputs_for_the_chosen_key(tmp_path, file_img):
    path = tmp_path / "IN1K-vit.tiny-300e.pth.tar"
    parts = ijepa_file(path, img=file_img)
    method = load(path, IJEPA_CFG).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        target, online = method.eval_encoder("target_encoder")(x), method.eval_encoder("encoder")(x)
    assert target.shape == (2, 64, DIM)
    assert torch.allclose(target, reference_tokens(parts["target_encoder"], 64, False, x, file_img // PATCH), atol=1e-4)
    assert torch.allclose(online, reference_tokens(parts["encoder"], 64, False, x, file_img // PATCH), atol=1e-4)
    assert not torch.allclose(target, online, atol=1e-3)
    if file_img == 64:
        assert all(torch.equal(v, parts["predictor"][k]) for k, v in method.predictor.state_dict().items())


@pytest.mark.parametrize("file_img", [64, 32])
def test_mae_file_gives_timms_outputs_with_and_without_cls(tmp_path, file_img):
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    weights = mae_file(path, img=file_img)
    method = load(path, MAE_CFG).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = reference_tokens(weights, 64, True, x, file_img // PATCH)
    with torch.no_grad():
        assert torch.allclose(method.encoder.forward_with_cls(x), ref, atol=1e-4)
        assert torch.allclose(method.eval_encoder("encoder")(x), ref[:, 1:], atol=1e-4)
    if file_img == 64:
        assert all(torch.equal(v, weights[k]) for k, v in method.predictor.state_dict().items())
    else:  # the decoder's table is resampled onto the new grid too
        assert method.predictor.decoder_pos_embed.shape == (1, 65, WIDTH)


def test_encoder_only_mae_file_loads_without_a_decoder(tmp_path):
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    mae_file(path, decoder=False)
    method = load(path, MAE_CFG)
    assert method.predictor is None  # never a random decoder passed off as the released one
    with pytest.raises(ValueError, match="encoder-only checkpoint"):
        method.predict_full(torch.randn(1, 64, DIM))
    assert isinstance(method.new_predictor(), MAEDecoder)  # the random control still exists


def test_pos_embed_resampling_is_bicubic_on_the_grid():
    from methods.vit import resample_pos_embed

    pos = torch.randn(1, 1 + 16, 8)
    ours = resample_pos_embed(pos, 6, 6, 1)
    ref = resample_abs_pos_embed(pos, new_size=(6, 6), num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    assert ours.shape == (1, 37, 8) and torch.allclose(ours, ref, atol=1e-6) and torch.equal(ours[:, 0], pos[:, 0])
    assert resample_pos_embed(pos, 4, 4, 1) is pos


def _wrong_shape(w):
    w["blocks.1.attn.proj.weight"] = torch.zeros(DIM, DIM - 1)


@pytest.mark.parametrize(
    "edit, overrides, message",
    [
        (_wrong_shape, MAE_CFG, "mis-shaped (1): blocks.1.attn.proj.weight (192, 191) vs (192, 192)"),
        (lambda w: w.pop("norm.bias"), MAE_CFG, "missing (1): norm.bias"),
        (lambda w: w.update({"head.weight": torch.zeros(10, DIM)}), MAE_CFG, "unexpected (1): head.weight"),
        (
            lambda w: w.pop("decoder_norm.bias"),
            MAE_CFG,
            "decoder does not match the model: missing (1): decoder_norm.bias",
        ),
        (None, [*MAE_CFG, "model.depth=3"], "depth=2 (config model.depth=3)"),
        (None, [*MAE_CFG, "method.predictor.width=64"], "width=48 (config method.predictor.width=64)"),
        (None, IJEPA_CFG, "is an MAE checkpoint ({'model': ...}): use method=mae, not method=ijepa"),
    ],
)
def test_mae_file_mismatches_are_named(tmp_path, edit, overrides, message):
    path = tmp_path / "m.pth"
    mae_file(path, edit=edit)
    with pytest.raises(ckpt.CheckpointError) as err:
        load(path, overrides)
    assert message in str(err.value) and str(path) in str(err.value)


def test_ijepa_file_mismatches_are_named(tmp_path):
    path = tmp_path / "i.pth.tar"
    parts = ijepa_file(path)
    with pytest.raises(ckpt.CheckpointError, match="use method=ijepa"):
        load(path, MAE_CFG)
    with pytest.raises(ckpt.CheckpointError, match=r"depth=1 \(config method.predictor.depth=2\)"):
        load(path, [*IJEPA_CFG, "method.predictor.depth=2"])
    state = torch.load(path, weights_only=True)
    state["target_encoder"]["module.blocks.0.norm1.weight"] = torch.ones(DIM + 1)
    del state["predictor"]
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError, match="lacks predictor"):
        load(path, IJEPA_CFG)
    state["predictor"] = {f"module.{k}": v for k, v in parts["predictor"].items()}
    torch.save(state, path)
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"'target_encoder' does not match the model: mis-shaped \(1\): "
        r"blocks.0.norm1.weight \(193,\) vs \(192,\)",
    ):
        load(path, IJEPA_CFG)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ckpt.CheckpointError, match="unknown checkpoint layout"):
        load(path, IJEPA_CFG)


class RunsCode:
    """A pickle whose loading would create a file: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_that_runs_code_is_refused_and_never_runs(bench, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mae_pretrain_vit_evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "payload": RunsCode(marker)}, path)
    assert not marker.exists()
    proc = bench("run", "method=mae", f"checkpoint={path}", *TINY)
    assert proc.returncode == 2 and not marker.exists()
    assert f"cannot read checkpoint {path}: it holds objects that run code when loaded (io.open)" in proc.stderr
    assert "refused" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_official_files_evaluate_through_the_cli_and_records_name_file_and_key(bench, tmp_path):
    ijepa, mae, bad = tmp_path / "IN1K-vit.tiny.pth.tar", tmp_path / "mae_pretrain_vit_tiny.pth", tmp_path / "bad.pth"
    ijepa_file(ijepa)
    mae_file(mae, decoder=False)
    mae_file(bad, edit=_wrong_shape)
    bench("run", "method=ijepa", f"checkpoint={ijepa}", "checkpoint_key=encoder", "run_dir=results/i", *TINY, check=0)
    bench("run", "method=mae", f"checkpoint={mae}", "run_dir=results/m", *TINY, check=0)
    for run, path, key in (("i", ijepa, "encoder"), ("m", mae, "encoder")):
        rec = json.loads((tmp_path / "results" / run / "records/linear.json").read_text())
        assert rec["status"] == "ok" and rec["checkpoint"] == {"path": str(path), "key": key}
        assert rec["config"]["checkpoint_key"] == key and 0 <= rec["metrics"]["top1"] <= 100
        assert not (tmp_path / "results" / run / "records/pretrain.json").exists()
    proc = bench("run", "method=mae", f"checkpoint={bad}", *TINY)
    assert proc.returncode == 2 and "blocks.1.attn.proj.weight (192, 191) vs (192, 192)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def our_checkpoint(path, method_name, extra=()):
    cfg = OmegaConf.to_container(load_config([*CFG, f"method={method_name}", *extra]), resolve=True)
    torch.manual_seed(0)
    method = build_method(cfg["method"]["name"], cfg["model"], cfg["method"], 64)
    # Two real AdamW steps, so the checkpoint holds moments as pretraining writes them.
    opt = make_optimizer(method, OmegaConf.create(cfg["pretrain"]))
    for group in opt.param_groups:
        group.update(lr=1e-3, weight_decay=0.04 if group["apply_wd"] else 0.0)
    for _ in range(2):
        sum((p**3).mean() for p in method.parameters() if p.requires_grad).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt.save(
        path,
        {
            "method": method.checkpoint_state(),
            "optimizer": opt.state_dict(),
            "step": 12,
            "total_steps": 12,
            "recent_losses": [0.5, 0.25],
            "config": cfg,
        },
    )
    return method, opt


@pytest.mark.parametrize("name", ["ijepa", "iwm", "mae"])
def test_export_then_import_gives_back_every_weight(tmp_path, name):
    method, _ = our_checkpoint(tmp_path / "last.pt", name)
    layout, payload = to_official(ckpt.load(tmp_path / "last.pt"))
    torch.save(payload, tmp_path / "official.pth")
    again = load(tmp_path / "official.pth", [*CFG, f"method={name}"])
    assert layout == ("mae" if name == "mae" else "ijepa")
    mine, theirs = method.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    if name == "ijepa":
        assert payload["epoch"] == 5 and payload["batch_size"] == 64  # all 12 steps done
        assert payload["loss"] == 0.375 and len(payload["opt"]["param_groups"]) == 4


def official_optimizer(method) -> torch.optim.AdamW:
    """The official I-JEPA optimiser over a method's networks: its four groups, by its own rule."""

    def part(module, decayed):
        return [p for n, p in module.named_parameters() if ("bias" not in n and len(p.shape) != 1) == decayed]

    return torch.optim.AdamW(
        [
            {"params": part(method.encoder, True)},
            {"params": part(method.predictor, True)},
            {"params": part(method.encoder, False), "WD_exclude": True, "weight_decay": 0},
            {"params": part(method.predictor, False), "WD_exclude": True, "weight_decay": 0},
        ]
    )


def test_exported_optimizer_resumes_in_the_official_four_groups(tmp_path):
    method, ours = our_checkpoint(tmp_path / "last.pt", "ijepa")
    _, payload = to_official(ckpt.load(tmp_path / "last.pt"))
    torch.save(payload, tmp_path / "official.pth")
    again = load(tmp_path / "official.pth", [*CFG, "method=ijepa"])
    official = official_optimizer(again)
    official.load_state_dict(torch.load(tmp_path / "official.pth", weights_only=True)["opt"])  # raises on a mismatch
    theirs_by_name = {n: official.state[p] for n, p in again.named_parameters() if p in official.state}
    ours_by_name = {n: ours.state[p] for n, p in method.named_parameters() if p in ours.state}
    trained = {n for n, p in method.named_parameters() if p.requires_grad}
    assert set(theirs_by_name) == set(ours_by_name) == trained and len(trained) > 10
    for name in trained:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(theirs_by_name[name][key], ours_by_name[name][key]), (name, key)
        assert float(theirs_by_name[name]["step"]) == 2.0
    groups = official.param_groups
    assert [g["weight_decay"] for g in groups] == [0.04, 0.04, 0.0, 0.0] and groups[2]["WD_exclude"]
    assert all(g["lr"] == 1e-3 and not g["fused"] for g in groups)
    # bf16 runs: the official loop has a GradScaler, and loads its state from the file.
    assert set(payload["scaler"]) == {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}


def test_bench_export_writes_files_other_tools_read(bench, tmp_path):
    for name in ("ijepa", "mae"):
        method, _ = our_checkpoint(tmp_path / f"{name}.pt", name)
        bench("export", str(tmp_path / f"{name}.pt"), str(tmp_path / f"{name}.pth"), check=0)
        state = torch.load(tmp_path / f"{name}.pth", weights_only=True)
        ref = timm_vit(64, name == "mae")
        if name == "ijepa":
            assert set(state) == {
                "encoder",
                "predictor",
                "target_encoder",
                "opt",
                "scaler",
                "epoch",
                "loss",
                "batch_size",
                "world_size",
                "lr",
            }
            assert all(
                k.startswith("module.") for part in ("encoder", "predictor", "target_encoder") for k in state[part]
            )
            ref.load_state_dict({k[len("module.") :]: v for k, v in state["target_encoder"].items()}, strict=True)
            ours = method.target_encoder
        else:
            assert set(state) == {"model"} and "decoder_pred.weight" in state["model"]
            ref.load_state_dict(
                {k: v for k, v in state["model"].items() if not k.startswith(("decoder_", "mask_token"))}, strict=True
            )
            ours = method.encoder.forward_with_cls
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(ours(x), ref.forward_features(x), atol=1e-4)
    enc_only = tmp_path / "mae_enc.pth"
    bench("export", str(tmp_path / "mae.pt"), str(enc_only), "--encoder-only", check=0)
    assert not any(k.startswith("decoder_") for k in torch.load(enc_only, weights_only=True)["model"])
    again = bench("export", str(tmp_path / "mae.pt"), str(enc_only))
    assert again.returncode == 2 and "already exists" in again.stderr
