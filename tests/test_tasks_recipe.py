"""The finetuning recipe's maths against hand-computed cases."""

import math

import pytest
import torch

from benchmark.core.optim import block_layers, param_groups
from methods.vit import VisionTransformer
from tasks.core import converged, loss_curve, loss_summary, set_drop_path
from tasks.finetune import train_pool
from tasks.heads import AttentiveClassifier
from tasks.mixing import mix, soft_cross_entropy, soft_targets


def test_layer_ids_and_layer_decay_scales():
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2)
    layers = block_layers(vit)
    assert layers["patch_embed.proj.weight"] == 0 and layers["pos_embed"] == 0
    assert layers["blocks.0.attn.qkv.weight"] == 1 and layers["blocks.2.mlp.fc2.bias"] == 3
    assert layers["norm.weight"] == 4
    groups = param_groups(vit, 0.05, 2.0, 0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert scale[id(vit.patch_embed.proj.weight)] == (2.0 * 0.5**4, 0.05)
    assert scale[id(vit.blocks[0].attn.qkv.weight)] == (2.0 * 0.5**3, 0.05)
    assert scale[id(vit.blocks[2].attn.qkv.bias)] == (2.0 * 0.5, 0.0)  # no decay on biases
    assert scale[id(vit.norm.weight)] == (2.0, 0.0)
    assert id(vit.pos_embed) not in scale  # fixed sin-cos table


def test_drop_path_rises_linearly_over_blocks():
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2)
    set_drop_path(vit, 0.2)
    assert isinstance(vit.blocks[0].drop_path1, torch.nn.Identity)
    assert [b.drop_path1.drop_prob for b in vit.blocks[1:]] == pytest.approx([0.1, 0.2])


def test_soft_targets_and_cross_entropy():
    t = soft_targets(torch.tensor([2, 0]), 4, 0.2)
    assert t[0].tolist() == pytest.approx([0.05, 0.05, 0.85, 0.05]) and t.sum(1).tolist() == pytest.approx([1, 1])
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    assert soft_cross_entropy(logits, t[:1]).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_mixup_is_a_convex_pair_and_cutmix_weights_follow_the_pasted_area():
    x = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    y = torch.tensor([0, 1])
    gen = torch.Generator().manual_seed(0)
    mixed, targets = mix(x, y, 2, 0.0, 0.8, 0.0, 1.0, 0.5, gen)
    lam = 1 - mixed[0].mean().item()  # image 0 = lam * zeros + (1 - lam) * ones
    assert targets[0].tolist() == pytest.approx([lam, 1 - lam], abs=1e-6)
    assert mixed[1].mean().item() == pytest.approx(lam, abs=1e-6)
    assert torch.equal(x[0], torch.zeros(1, 8, 8))  # the caller's tensor is left as it was
    for seed in range(5):
        cut, targets = mix(x, y, 2, 0.0, 0.0, 1.0, 1.0, 0.5, torch.Generator().manual_seed(seed))
        pasted = cut[0].mean().item()  # share of image 0 now taken from image 1
        assert set(cut.unique().tolist()) <= {0.0, 1.0}
        assert targets[0].tolist() == pytest.approx([1 - pasted, pasted])
    # Label smoothing alone, and the same draws from the same generator state.
    same, targets = mix(x, y, 2, 0.2, 0.0, 0.0, 1.0, 0.5, gen)
    assert torch.equal(same, x) and torch.allclose(targets, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    a = mix(x, y, 2, 0.1, 0.8, 1.0, 1.0, 0.5, torch.Generator().manual_seed(3))
    b = mix(x, y, 2, 0.1, 0.8, 1.0, 1.0, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_attentive_classifier_pools_tokens_through_one_learned_query():
    torch.manual_seed(0)
    head = AttentiveClassifier(16, 5, num_heads=4)
    tokens = torch.randn(3, 7, 16)
    out = head(tokens)
    assert out.shape == (3, 5)
    # Permuting the tokens leaves a (position-free) attention pool unchanged.
    assert torch.allclose(head(tokens[:, torch.randperm(7)]), out, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        AttentiveClassifier(10, 5, num_heads=4)


def test_train_pool_is_a_seeded_sorted_subset_or_everything():
    assert torch.equal(train_pool(5, None, 0), torch.arange(5)) and torch.equal(train_pool(5, 9, 0), torch.arange(5))
    a, b = train_pool(100, 10, 3), train_pool(100, 10, 3)
    assert torch.equal(a, b) and len(a.unique()) == 10 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, train_pool(100, 10, 4))


def official_mae_finetune_groups(model, weight_decay, layer_decay):
    """(lr scale, weight decay) per parameter name as the official MAE finetuning builds them: no
    decay on 1-D tensors and on pos_embed / cls_token, BEiT layer ids (embeddings 0, block i at
    i + 1, everything after the blocks at depth + 1)."""
    num_layers = len(model.blocks) + 1
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in ("pos_embed", "cls_token", "dist_token")
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks"):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = num_layers
        out[name] = (layer_decay ** (num_layers - layer), 0.0 if no_decay else weight_decay)
    return out


def test_mae_encoder_ft_groups_match_the_official_mae_finetuning_recipe(tmp_path):
    from omegaconf import OmegaConf

    from benchmark.config import load_config
    from methods import build_method
    from tasks import build_task
    from tasks.base import TaskContext

    cfg = OmegaConf.to_container(
        load_config(
            [
                "method=mae",
                "task=encoder_ft",
                "model.patch_size=8",
                "model.embed_dim=48",
                "model.num_heads=3",
                "model.depth=3",
                "method.predictor.depth=1",
                "method.predictor.width=24",
                "data.image_size=32",
            ]
        ),
        resolve=True,
    )
    method = build_method("mae", cfg["model"], cfg["method"], 32)
    task_cfg = dict(cfg["tasks"]["encoder_ft"], weight_decay=0.05, layer_decay=0.65)
    ctx = TaskContext(source=None, device=torch.device("cpu"), encoder_key="encoder", seed=0, run_dir=tmp_path)
    model, groups, _ = build_task("encoder_ft", task_cfg).build(method, ctx, 5, seed=0)
    ours = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    encoder = model.encoder
    official = official_mae_finetune_groups(encoder, 0.05, 0.65)
    named = dict(encoder.named_parameters())
    assert set(official) == {n for n, p in named.items() if id(p) in ours}  # same parameters trained
    for name, (scale, wd) in official.items():
        assert ours[id(named[name])] == pytest.approx((scale, wd)), name
    assert ours[id(encoder.cls_token)][1] == 0.0 and id(encoder.pos_embed) not in ours  # fixed sin-cos table
    # The head sits after the blocks (scale 1); its matrix decays, its norm and bias do not.
    assert ours[id(model.head.linear.weight)] == (1.0, 0.05) and ours[id(model.head.linear.bias)] == (1.0, 0.0)
    assert ours[id(model.head.norm.weight)] == (1.0, 0.0)
    assert len(ours) == sum(1 for _ in model.head.parameters()) + len(official)


def test_the_protocol_core_stops_on_a_non_finite_loss_naming_the_step():
    from benchmark.core.errors import DivergenceError
    from benchmark.core.optim import param_groups
    from tasks.core import train

    layer = torch.nn.Linear(3, 2)
    losses = [1.0, 0.5, float("nan")]

    def loss(step):
        return (layer.weight.sum() * 0 + losses[step]).requires_grad_()

    with pytest.raises(DivergenceError, match=r"probe: training loss is nan at step 2"):
        train(
            param_groups(layer, 0.0),
            range(3),
            3,
            lambda s: 0.1,
            loss,
            betas=(0.9, 0.999),
            clip_grad=0.0,
            device=torch.device("cpu"),
            precision="fp32",
            label="probe",
        )
    before = layer.weight.detach().clone()
    curve = train(
        param_groups(layer, 0.0),
        range(2),
        5,
        lambda s: 0.1,
        lambda s: layer.weight.pow(2).sum(),
        betas=(0.9, 0.999),
        clip_grad=1.0,
        device=torch.device("cpu"),
        precision="fp32",
        label="probe",
    )
    assert len(curve) == 2 and curve[1] < curve[0] and not torch.equal(before, layer.weight)


def test_convergence_rule_on_hand_made_loss_curves():
    # Exponential decay that has flattened long before the end: converged.
    flattened = [2.0 * math.exp(-i / 10) + 0.1 for i in range(200)]
    assert converged(flattened) is True
    # A straight line still falling at the end: its last fifth lowers the loss by a fifth of the
    # whole decrease (> 0.1), not converged.
    assert converged([2.0 - 0.01 * i for i in range(100)]) is False
    # A loss that never moved (a stuck head) has flattened too: the flag says "flat", not "good".
    assert converged([1.8] * 50) is True
    # Too few steps to tell.
    assert converged([1.0, 0.5, 0.2, 0.1]) is None
    summary = loss_summary(flattened, tail=20)
    assert summary["converged"] is True and summary["steps"] == 200
    assert summary["final_loss"] == pytest.approx(sum(flattened[-20:]) / 20)


def test_loss_curve_is_the_means_of_equal_windows():
    assert loss_curve(list(range(40))) == pytest.approx([i * 2 + 0.5 for i in range(20)])
    assert loss_curve([3.0, 1.0]) == [3.0, 1.0]  # fewer steps than points: one point per step
    assert loss_curve([]) == []
