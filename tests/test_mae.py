import json
import math

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf

from benchmark.config import load_config
from methods import build_method
from methods.losses import normalize_patches, patchify
from methods.mae import MAEDecoder, sincos_with_cls
from methods.masks import random_masking


def tiny_mae(*overrides, seed=0):
    cfg = OmegaConf.to_container(
        load_config(
            [
                "method=mae",
                "model.depth=2",
                "model.patch_size=8",
                "method.predictor.depth=2",
                "method.predictor.width=32",
                "data.image_size=32",
                *overrides,
            ]
        ),
        resolve=True,
    )
    torch.manual_seed(seed)
    mae = build_method("mae", cfg["model"], cfg["method"], 32).eval()
    with torch.no_grad():  # away from the init's zeros and ones, so every parameter matters
        for p in mae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mae


def test_random_masking_by_hand():
    noise = torch.tensor([[0.3, 0.1, 0.4, 0.2], [0.0, 0.9, 0.8, 0.7]])
    m = random_masking(noise, 0.5)
    assert m.keep.tolist() == [[1, 3], [0, 3]]
    assert m.removed.tolist() == [[0, 2], [2, 1]]
    assert m.mask.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]
    again = random_masking(noise.clone(), 0.5)
    assert all(torch.equal(a, b) for a, b in zip(m, again))
    assert random_masking(torch.rand(3, 64), 0.75).keep.shape == (3, 16)  # int(64 * 0.25)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 0.99])
def test_random_masking_refuses_ratios_that_keep_or_remove_nothing(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(torch.rand(1, 16), ratio)


def test_norm_pix_targets_use_the_unbiased_variance():
    out = normalize_patches(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]))
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3 + 1e-6)
    assert torch.allclose(out[0, 0], expected)


def test_patchify_flattens_row_column_channel():
    img = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    x = patchify(img, 2)
    assert x.shape == (2, 6, 12)
    for b, n, r, c, ch in [(0, 0, 0, 0, 0), (1, 4, 1, 0, 2), (0, 5, 1, 1, 1), (1, 2, 0, 1, 0)]:
        row, col = divmod(n, 3)
        assert x[b, n, (r * 2 + c) * 3 + ch] == img[b, ch, 2 * row + r, 2 * col + c]


def official_forward(mae, imgs, noise, ratio, norm_pix):
    """MAE's forward as the released code writes it: shuffle, keep, restore by gather, full decoder."""
    enc, dec, p = mae.encoder, mae.predictor, mae.encoder.patch_size
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:, :]
    n, length, d = x.shape
    keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1, :]).expand(n, -1, -1), x], dim=1)
    for blk in enc.blocks:
        x = blk(x)
    x = dec.decoder_embed(enc.norm(x))
    mask_tokens = dec.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + dec.decoder_pos_embed
    for blk in dec.decoder_blocks:
        x = blk(x)
    pred = dec.decoder_pred(dec.decoder_norm(x))[:, 1:, :]
    h = imgs.shape[2] // p
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(n, 3, h, p, h, p)).reshape(n, h * h, p * p * 3)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_training_step_equals_the_official_forward_for_the_same_noise(norm_pix):
    mae = tiny_mae(f"method.norm_pix_loss={str(norm_pix).lower()}")
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        ours = mae.training_step({"images": imgs, "noise": noise})["loss"]
        ref = official_forward(mae, imgs, noise, 0.75, norm_pix)
        other = mae.training_step({"images": imgs, "noise": torch.rand(3, 16)})["loss"]
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, other)  # the noise decides what is removed


def test_predict_full_is_the_decoder_with_nothing_masked():
    mae = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    dec = mae.predictor
    with torch.no_grad():
        with_cls = mae.encoder.forward_with_cls(imgs)
        x = dec.decoder_embed(with_cls) + dec.decoder_pos_embed
        for blk in dec.decoder_blocks:
            x = blk(x)
        ref = dec.decoder_norm(x)[:, 1:]
        x = dec.decoder_embed(with_cls[:, 1:]) + dec.decoder_pos_embed[:, 1:]
        for blk in dec.decoder_blocks:
            x = blk(x)
        ref_patches_only = dec.decoder_norm(x)
        full = mae.predict_full(with_cls)
        from_eval = mae.predict_full(mae.eval_encoder("encoder")(imgs))
    assert full.shape == (2, 16, 32)
    assert torch.allclose(full, ref, atol=1e-5)
    assert torch.allclose(from_eval, ref_patches_only, atol=1e-5)


def test_predict_gives_pixels_at_the_queries_and_ignores_their_order():
    mae = tiny_mae()
    tokens = mae.eval_encoder("encoder")(torch.randn(2, 3, 32, 32)).detach()
    ctx_idx = torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4]])
    tgt_idx = torch.tensor([[1, 2, 3], [8, 12, 0]])
    with torch.no_grad():
        out = mae.predict(tokens[:, :4], ctx_idx, tgt_idx, action=torch.randn(2, 7))
        flipped = mae.predict(tokens[:, :4], ctx_idx, tgt_idx.flip(1))
    assert out.shape == (2, 3, 8 * 8 * 3)
    assert torch.allclose(out, flipped.flip(1), atol=1e-5)


def test_new_predictor_has_the_architecture_and_fresh_weights():
    mae = tiny_mae()
    fresh = mae.new_predictor()
    assert isinstance(fresh, MAEDecoder)
    old, new = mae.predictor.state_dict(), fresh.state_dict()
    assert {k: v.shape for k, v in old.items()} == {k: v.shape for k, v in new.items()}
    assert not torch.equal(old["decoder_embed.weight"], new["decoder_embed.weight"])
    assert torch.equal(new["decoder_pos_embed"], sincos_with_cls(32, 4))  # the fixed table, not a draw


def test_eval_encoder_gives_patch_tokens_and_the_cls_token_stays_reachable():
    mae = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = mae.eval_encoder("encoder")(imgs)
        full = mae.encoder.forward_with_cls(imgs)
        cls = mae.encoder.cls_features(imgs)
    assert tokens.shape == (2, 16, 192) and torch.equal(tokens, full[:, 1:]) and torch.equal(cls, full[:, 0])
    assert mae.target_encoder is None and mae.default_encoder_key == "encoder"
    with pytest.raises(ValueError, match="no target encoder"):
        mae.eval_encoder("target_encoder")


def test_mae_presets_carry_maes_optimiser_and_the_lr_scaling_rule():
    cpu = load_config(["method=mae"])
    assert cpu.choices.pretrain == "mae_cpu" and list(cpu.pretrain.betas) == [0.9, 0.95]
    assert cpu.pretrain.weight_decay == cpu.pretrain.final_weight_decay == 0.05
    assert cpu.pretrain.lr == pytest.approx(cpu.pretrain.blr * 64 / 256)
    paper = load_config(["method=mae_paper", "pretrain=mae_paper", "model=vit_base"])
    assert paper.pretrain.lr == pytest.approx(1.5e-4 * 4096 / 256) and paper.pretrain.warmup_epochs == 40
    assert (paper.method.predictor.depth, paper.method.predictor.width, paper.method.predictor.num_heads) == (
        8,
        512,
        16,
    )
    assert load_config(["method=mae", "pretrain=mae_paper", "pretrain.batch_size=1024"]).pretrain.lr == pytest.approx(
        6e-4
    )
    assert load_config(["method=mae", "pretrain=cpu"]).choices.pretrain == "cpu"  # the command line wins
    assert load_config(["method=ijepa"]).choices.pretrain == "cpu"


@pytest.mark.parametrize(
    "args, message",
    [
        (["method.mask_ratio=1.0"], "mask_ratio"),
        (["method.predictor.num_heads=5"], "not divisible by method.predictor.num_heads=5"),
        (["checkpoint_key=target_encoder"], "method mae has no target encoder: use checkpoint_key=encoder"),
    ],
)
def test_bad_mae_settings_exit_2(bench, args, message):
    proc = bench("run", "method=mae", *TINY, *args)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_run_mae_linear_end_to_end_records_the_encoder_key(bench, tmp_path):
    proc = bench("run", "method=mae", "task=linear", "run_dir=results/mae", *TINY, check=0)
    run = tmp_path / "results/mae"
    rec = json.loads((run / "records/linear.json").read_text())
    assert rec["method"] == "mae" and rec["status"] == "ok" and "linear" in proc.stdout
    assert rec["checkpoint"] == {"path": str(run / "checkpoints/last.pt"), "key": "encoder"}
    assert rec["config"]["checkpoint_key"] == "encoder" and rec["config"]["choices"]["pretrain"] == "mae_cpu"
    assert rec["metrics"]["feature_dim"] == 192 and 0 <= rec["metrics"]["top1"] <= 100
    pre = json.loads((run / "records/pretrain.json").read_text())["metrics"]
    assert pre["steps"] == 6 and math.isfinite(pre["final_loss"]) and pre["final_loss"] > 0
