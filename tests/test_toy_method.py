"""The method contract suffices: a toy method in one file (tests/toy_method.py), registered
through the registry alone, pretrains and runs every task that applies to it end to end."""

import math

import pytest
import torch
from tasks_helpers import context, tiny_config, tiny_data
from toy_method import Toy

import methods
from benchmark.core.checkpoint import load, save
from benchmark.pretrain import pretrain
from benchmark.records import headline
from tasks import TASKS, build_task

TOY_MODEL = {"patch_size": 8, "embed_dim": 48, "depth": 2}
SEG = {
    "crop_size": 32,
    "scale": [128, 32],
    "stride": 16,
    "iters": 3,
    "batch_size": 4,
    "channels": 16,
    "aux_channels": 8,
    "vis_images": 1,
    "warmup_iters": 1,
    "bf16": False,
}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "toy", methods.METHODS.get("toy"))  # restored after the test
    methods.METHODS.pop("toy")
    return methods.register(Toy)


def test_toy_method_pretrains_and_runs_every_task_that_applies(registered, tmp_path):
    from omegaconf import OmegaConf

    cfg = tiny_config()
    source = tiny_data(tmp_path / "shapes")
    torch.manual_seed(0)
    toy = methods.build_method("toy", TOY_MODEL, {}, 32)
    before = toy.encoder.blocks[0].mlp.fc1.weight.detach().clone()
    pre = OmegaConf.create(dict(cfg["pretrain"], epochs=2, batch_size=8, checkpoint_every=0, bf16=False))
    stats = pretrain(
        toy,
        source,
        pre,
        0,
        torch.device("cpu"),
        tmp_path / "run" / "checkpoints",
        {"pretrain": dict(pre)},
        show_progress=False,
    )
    assert stats["steps"] == 8 and math.isfinite(stats["final_loss"])
    assert not torch.equal(before, toy.encoder.blocks[0].mlp.fc1.weight)
    # Its checkpoint rebuilds it through the registry, weights and all.
    save(tmp_path / "toy.pt", {"method": toy.checkpoint_state()})
    again = methods.method_from_state(load(tmp_path / "toy.pt")["method"])
    assert isinstance(again, Toy) and torch.equal(again.predictor.queries, toy.predictor.queries)

    ctx = context(source, tmp_path / "run")
    ctx.encoder_key = toy.default_encoder_key
    ran, skipped = {}, {}
    for name in TASKS:
        task_cfg = dict(cfg["tasks"][name], **(SEG if name == "ade20k" else {}))
        if name in ("encoder_ft", "end_to_end"):  # the toy's layers are no transformer blocks
            task_cfg.update(layer_decay=None, drop_path=0.0)
        task = build_task(name, task_cfg)
        verdict = task.applies_to(toy)
        if not verdict:
            skipped[name] = verdict.reason
            continue
        task.check(toy)
        metrics = task.run(toy.eval(), ctx)
        ran[name] = headline({"task": name, "metrics": metrics})
    assert skipped == {"mrr": "method toy: it has no target encoder and no masks"}
    assert set(ran) == set(TASKS) - {"mrr"}
    for name, (metric, value) in ran.items():
        assert value is not None and math.isfinite(value), name
        assert 0 <= value <= 100, (name, metric, value)
    assert ran["ade20k"][0] == "miou" and ran["linear"][0] == "top1"
    # Settings that cannot work with the method fail in check(), before any compute.
    with pytest.raises(ValueError, match="head_heads=5 does not divide the width 48"):
        build_task("predictor_ft", dict(cfg["tasks"]["predictor_ft"], head_heads=5)).check(toy)
    # Layer decay and stochastic depth would do nothing on it: asking for them is refused.
    with pytest.raises(ValueError, match="layer_decay=0.75: method toy's encoder has no transformer blocks"):
        build_task("encoder_ft", cfg["tasks"]["encoder_ft"]).check(toy)
    with pytest.raises(ValueError, match="drop_path=0.1: method toy's encoder has no transformer blocks"):
        build_task("end_to_end", dict(cfg["tasks"]["end_to_end"], layer_decay=None)).check(toy)
    with pytest.raises(ValueError, match="drop_path=0.2: method toy's predictor has no transformer blocks"):
        build_task("predictor_ft", dict(cfg["tasks"]["predictor_ft"], drop_path=0.2)).check(toy)


def test_register_refuses_a_second_method_of_the_same_name(registered):
    class Other(Toy):
        pass

    with pytest.raises(ValueError, match="registered already"):
        methods.register(Other)
    with pytest.raises(TypeError, match="not a Method"):
        methods.register(int)


def test_an_encoder_only_method_implements_none_of_the_predictor_members():
    """The predictor members have defaults that say there is none: a method without a world model
    defines only what it has, and the tasks that need one do not apply to it."""
    from methods.base import Capabilities, Method
    from tasks.base import Applies

    class EncoderOnly(Method):
        name = "encoder_only"
        default_encoder_key = "encoder"
        train_transform, collate, training_step, dense_features = (
            Toy.train_transform,
            Toy.collate,
            Toy.training_step,
            Toy.dense_features,
        )

        def __init__(self, model_cfg, method_cfg, image_size):
            super().__init__(model_cfg, method_cfg, image_size)
            self.encoder = Toy(model_cfg, method_cfg, image_size).encoder

        @property
        def capabilities(self):
            return Capabilities(predictor=False, target_encoder=False, conditioned=False)

    method = EncoderOnly(TOY_MODEL, {}, 32)
    assert method.token_heads == 1  # the toy encoder has no attention heads
    for call in (method.new_predictor, lambda: method.predict(None, None, None)):
        with pytest.raises(ValueError, match="method encoder_only has no predictor"):
            call()
    assert not Applies.needs(method, predictor=True)
    assert build_task("linear", tiny_config()["tasks"]["linear"]).applies_to(method)


def test_an_encoder_that_does_not_declare_its_geometry_is_refused_when_built(registered):
    """The tasks read the encoder's patch size, grid and width: a method whose encoder does not
    declare them fails when it is built, naming the attribute, not deep inside a task."""

    class Undeclared(Toy):
        name = "toy"

        def __init__(self, model_cfg, method_cfg, image_size):
            super().__init__(model_cfg, method_cfg, image_size)
            del self.encoder.depth

    methods.METHODS["toy"] = Undeclared
    with pytest.raises(TypeError, match="its encoder does not declare depth as a positive integer"):
        methods.build_method("toy", TOY_MODEL, {}, 32)
    methods.METHODS["toy"] = Toy
    assert methods.build_method("toy", TOY_MODEL, {}, 32).encoder.grid == 4
