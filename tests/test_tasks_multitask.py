"""Multitask predictor tuning and the task tokens it hands the predictor."""

import pytest
import torch
from tasks_helpers import context, same, snapshot, tiny_config, tiny_data, tiny_method

from tasks import build_task


def test_task_tokens_change_the_world_model_output_and_none_changes_nothing():
    cfg = tiny_config()
    method = tiny_method(cfg)
    tokens = torch.randn(2, 16, 48)
    with torch.no_grad():
        plain = method.predict_full(tokens)
        a = method.predict_full(tokens, extra=torch.randn(2, 1, 48))
        b = method.predict_full(tokens, extra=torch.randn(2, 1, 48))
        idx = torch.arange(16).expand(2, -1)
        assert torch.equal(plain, method.predictor(tokens, idx, idx))
    assert a.shape == plain.shape == (2, 16, 48)
    assert not torch.allclose(a, b) and not torch.allclose(a, plain)


def test_multitask_tunes_one_predictor_with_a_token_and_head_per_label_set(tmp_path):
    cfg = tiny_config()
    source = tiny_data(tmp_path / "shapes")
    method = tiny_method(cfg)
    before = snapshot(method)
    task = build_task("multitask", cfg["tasks"]["multitask"])
    ctx = context(source, tmp_path)
    m = task.run(method, ctx)
    assert same(before, snapshot(method))
    assert m["label_sets"] == ["colour", "count"]
    colour, shape = m["per_task"]["colour"], m["per_task"]["count"]
    assert colour["num_classes"] == 12 and shape["num_classes"] == 4
    assert m["top1"] == pytest.approx((colour["multitask_top1"] + shape["multitask_top1"]) / 2)
    assert m["separate_top1"] == pytest.approx((colour["separate_top1"] + shape["separate_top1"]) / 2)
    # Val accuracies over 16 images are multiples of 1/16.
    for row in (colour, shape):
        for key in ("multitask_top1", "separate_top1"):
            assert (row[key] * 16 / 100) == pytest.approx(round(row[key] * 16 / 100))

    model = task.build(method, ctx, [12, 4], 0)
    tokens0, pred0 = model.task_tokens.detach().clone(), snapshot(model.work.predictor)
    assert same(pred0, snapshot(method.predictor)) and model.work.predictor is not method.predictor
    assert [h.linear.out_features for h in model.heads] == [12, 4]
    one_predictor = sum(p.numel() for p in method.predictor.parameters() if p.requires_grad)
    heads = sum(p.numel() for p in model.heads.parameters())
    assert m["trainable_params"] == one_predictor + heads + tokens0.numel()
    assert m["separate_trainable_params"] > m["trainable_params"]  # two predictors against one


def test_multitask_needs_two_label_sets(bench):
    proc = bench("run", "method=iwm", "task=multitask", "tasks.multitask.label_sets=[colour]")
    assert proc.returncode == 2 and "tasks.multitask.label_sets must list at least two" in proc.stderr
