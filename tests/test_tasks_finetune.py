"""The finetuning adapters on a tiny method: what trains, what stays frozen, where metrics come from."""

import copy

import pytest
import torch
from tasks_helpers import context, same, snapshot, tiny_config, tiny_data, tiny_method

from benchmark.core.seeding import derive_seed
from tasks import build_task


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data") / "shapes")


def tune(name, cfg, source, tmp_path, method=None, **ctx_kw):
    method = method or tiny_method(cfg)
    before = snapshot(method)
    ctx = context(source, tmp_path, **ctx_kw)
    metrics, model = build_task(name, cfg["tasks"][name]).tune(method, ctx)
    assert same(before, snapshot(method)), f"{name} changed the run's method"
    assert not method.training and not method.target_encoder.training
    return method, ctx, metrics, model


def params(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def changed(a: dict, b: dict) -> set:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_predictor_ft_trains_a_copy_of_the_predictor_and_the_head_only(cfg, source, tmp_path):
    method, ctx, m, model = tune("predictor_ft", cfg, source, tmp_path)
    tuned = model.world_model.predictor
    assert tuned is not method.predictor and model.world_model.target_encoder is method.target_encoder
    moved = changed(params(tuned), params(method.predictor))
    assert "predictor_embed.weight" in moved and "predictor_blocks.0.attn.qkv.weight" in moved
    assert "predictor_pos_embed" not in moved  # the fixed sin-cos table stays fixed
    n_head = sum(p.numel() for p in model.head.parameters())
    n_pred = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert m["trainable_params"] == n_head + n_pred
    assert m["predictor"] == "pretrained" and m["inputs"] == "cached tokens" and m["train_seconds"] > 0
    assert m["train_samples"] == 32 and m["val_samples"] == 16 and m["steps"] == 4


def test_train_samples_trains_on_a_subset(cfg, source, tmp_path):
    small = dict(cfg, tasks=dict(cfg["tasks"], predictor_ft=dict(cfg["tasks"]["predictor_ft"], train_samples=16)))
    _, _, m, _ = tune("predictor_ft", small, source, tmp_path)
    assert m["train_samples"] == 16 and m["steps"] == 2 and m["val_samples"] == 16


def test_reported_top1_is_the_val_split_accuracy_of_the_trained_model(cfg, source, tmp_path):
    method, ctx, m, model = tune("predictor_ft", cfg, source, tmp_path)
    tokens = ctx.frozen_tokens(method, "val")
    labels, classes = ctx.labels("val")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(tokens).argmax(-1)
    assert len(labels) == 16 and classes == 12 == m["num_classes"]
    assert m["top1"] == pytest.approx(100 * (pred == labels).float().mean().item())


def test_random_predictor_control_starts_from_a_fresh_init(cfg, source, tmp_path):
    method = tiny_method(cfg)
    task = build_task("predictor_ft_random", cfg["tasks"]["predictor_ft_random"])
    ctx = context(source, tmp_path)
    seed = derive_seed(ctx.seed, sum(map(ord, task.name)))
    model, groups, work = task.build(method, ctx, 6, seed)
    torch.manual_seed(derive_seed(seed, 2))
    reference = method.new_predictor()
    assert same(snapshot(work.predictor), snapshot(reference))  # a fresh init under the same seed
    assert same(snapshot(copy.deepcopy(method).reset_predictor(derive_seed(seed, 2))), snapshot(reference))
    differ = changed(params(work.predictor), params(method.predictor))
    assert "predictor_blocks.0.mlp.fc1.weight" in differ  # not the pretrained weights
    pretrained, _, pwork = build_task("predictor_ft", cfg["tasks"]["predictor_ft"]).build(method, ctx, 6, seed)
    assert same(snapshot(pwork.predictor), snapshot(method.predictor))
    # Its own lr scale (the paper's 10x, in the CPU preset too), and any other one when set.
    scales = {g["lr_scale"] for g in groups for p in g["params"] if any(p is q for q in work.predictor.parameters())}
    assert scales == {cfg["tasks"]["predictor_ft_random"]["predictor_lr_scale"]} == {10.0}
    same_lr = {**cfg["tasks"]["predictor_ft_random"], "predictor_lr_scale": 1.0}
    _, groups, work = build_task("predictor_ft_random", same_lr).build(method, ctx, 6, seed)
    scales = {g["lr_scale"] for g in groups for p in g["params"] if any(p is q for q in work.predictor.parameters())}
    assert scales == {1.0}

    _, _, m, _ = tune("predictor_ft_random", cfg, source, tmp_path, method=method)
    assert m["predictor"] == "random" and m["predictor_lr"] == pytest.approx(10 * m["lr"])


def test_encoder_ft_trains_a_copy_of_the_eval_encoder_with_drop_path(cfg, source, tmp_path):
    method, ctx, m, model = tune("encoder_ft", cfg, source, tmp_path)
    enc = model.encoder
    assert enc is not method.target_encoder and model.world_model is None
    moved = changed(params(enc), params(method.target_encoder))
    assert "blocks.0.attn.qkv.weight" in moved and "patch_embed.proj.weight" in moved
    assert "pos_embed" not in moved and not enc.pos_embed.requires_grad
    assert type(enc.blocks[-1].drop_path1).__name__ == "DropPath"
    assert m["inputs"] == "images" and m["encoder"] == "trained" and m["val_samples"] == 16


def test_end_to_end_trains_encoder_and_predictor(cfg, source, tmp_path):
    method, ctx, m, model = tune("end_to_end", cfg, source, tmp_path)
    assert changed(params(model.encoder), params(method.target_encoder))
    assert changed(params(model.world_model.predictor), params(method.predictor))
    n = sum(
        p.numel()
        for p in [*model.head.parameters(), *model.encoder.parameters(), *model.world_model.predictor.parameters()]
        if p.requires_grad
    )
    assert m["trainable_params"] == n


def test_attentive_probe_trains_the_head_only_and_streaming_matches_the_cache(cfg, source, tmp_path):
    _, _, cached, model = tune("attentive", cfg, source, tmp_path)
    assert cached["trainable_params"] == sum(p.numel() for p in model.head.parameters())
    assert model.encoder is None and model.world_model is None
    method, ctx, streamed, _ = tune("attentive", cfg, source, tmp_path, token_cache_bytes=0)
    assert ctx.frozen_tokens(method, "train") is None and streamed["inputs"] == "tokens encoded per batch"
    assert streamed["final_loss"] == pytest.approx(cached["final_loss"], rel=1e-3)
    assert streamed["top1"] == pytest.approx(cached["top1"])


def kernels(module):
    return {m.fused_attn for m in module.modules() if hasattr(m, "fused_attn")}


@pytest.mark.parametrize("bf16, fused", [(True, False), (False, True)])
def test_task_stages_run_the_attention_kernel_their_precision_calls_for(cfg, source, tmp_path, bf16, fused):
    """attention=auto on CPU: math under a task's bf16 (faster there), SDPA in float32; the fresh
    predictor of the random control runs the same kernels; the method's own come back after."""
    from benchmark.runner import run_task
    from tasks.finetune import RandomPredictorFinetune

    seen = {}

    class Watched(RandomPredictorFinetune):
        def build(self, method, ctx, num_classes, seed):
            model, groups, work = super().build(method, ctx, num_classes, seed)
            seen.update(encoder=kernels(work.eval_encoder(ctx.encoder_key)), predictor=kernels(work.predictor))
            return model, groups, work

    method = tiny_method(cfg)
    assert kernels(method) == {True}
    task = Watched({**cfg["tasks"]["predictor_ft_random"], "epochs": 1, "precision": "bf16" if bf16 else "fp32"})
    metrics = run_task(task, method, context(source, tmp_path), "auto")
    assert seen == {"encoder": {fused}, "predictor": {fused}}
    assert kernels(method) == {True}  # restored
    assert len(metrics["loss_curve"]) == min(20, metrics["steps"]) > 0
    assert metrics["converged"] in ((None,) if metrics["steps"] < 5 else (True, False))


def test_frozen_tokens_are_extracted_with_one_kernel_whichever_task_asks_first(cfg, source, tmp_path):
    """Extraction runs in float32 with the float32 kernel of the run's setting, so a bf16 task
    (math kernel) and a float32 one that fill the cache first fill it with the same tokens."""
    from benchmark.core.layers import use_attention

    method = tiny_method(cfg)
    first = context(source, tmp_path).frozen_tokens(method, "val")
    restore = use_attention(method, "math", torch.device("cpu"), bf16=True)  # as during a bf16 task
    again = context(source, tmp_path).frozen_tokens(method, "val")
    assert kernels(method) == {False}  # the task's kernel is back after extraction
    restore()
    assert torch.equal(first, again)
