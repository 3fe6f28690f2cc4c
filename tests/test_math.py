import math

import numpy as np
import pytest
import torch

from benchmark.core.schedules import cosine, linear, warmup_cosine
from methods.losses import ema_update, latent_regression, normalize_targets
from methods.vit import sincos_2d


def test_warmup_cosine_at_known_steps():
    kw = dict(total=100, warmup=10, start=2e-4, peak=1e-3, final=1e-6)
    assert warmup_cosine(0, **kw) == pytest.approx(2e-4)
    assert warmup_cosine(5, **kw) == pytest.approx(6e-4)
    assert warmup_cosine(10, **kw) == pytest.approx(1e-3)
    assert warmup_cosine(55, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert warmup_cosine(100, **kw) == pytest.approx(1e-6)
    assert warmup_cosine(150, **kw) == pytest.approx(1e-6)


def test_weight_decay_cosine_and_linear_momentum():
    assert cosine(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(25, 100, 0.04, 0.4) == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert linear(0.25, 1.0, 0.996, 1.0) == pytest.approx(0.997)
    assert linear(2.0, 1.0, 0.996, 1.0) == pytest.approx(1.0)


def test_ema_update_math():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    online = [torch.tensor([3.0, -2.0]), torch.tensor([[10.0]])]
    ema_update(target, online, 0.9)
    assert torch.allclose(target[0], torch.tensor([1.2, 1.6]))
    assert torch.allclose(target[1], torch.tensor([[1.0]]))


def test_losses_on_a_hand_computed_case():
    pred = torch.tensor([[0.0, 0.5], [3.0, -1.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    # smooth L1 (beta 1): |d|<1 -> d^2/2, else |d|-1/2; d = 1, .5, 3, 0
    assert latent_regression(pred, target, "smooth_l1").item() == pytest.approx((0.5 + 0.125 + 2.5 + 0) / 4)
    assert latent_regression(pred, target, "l2").item() == pytest.approx((1 + 0.25 + 9 + 0) / 4)
    assert latent_regression(pred, target, "l1").item() == pytest.approx((1 + 0.5 + 3 + 0) / 4)
    with pytest.raises(ValueError):
        latent_regression(pred, target, "huber")


def test_target_normalisation_is_layernorm_without_affine():
    h = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mean, var = 3.0, ((4 + 1 + 0 + 9) / 4)
    expected = (h - mean) / math.sqrt(var + 1e-5)
    assert torch.allclose(normalize_targets(h), expected, atol=1e-6)


def test_sincos_table_by_hand():
    table = sincos_2d(4, 2, 3)  # 2 rows, 3 columns, dim 4: [sin col, cos col, sin row, cos row]
    assert table.shape == (6, 4)
    for r in range(2):
        for c in range(3):
            expect = [math.sin(c), math.cos(c), math.sin(r), math.cos(r)]
            assert np.allclose(table[r * 3 + c].numpy(), expect)


class OfficialWarmupCosine:
    """The official I-JEPA lr and wd schedulers as their training loop drives them: `step()`
    advances the counter first, then returns the value the coming optimiser step uses."""

    def __init__(self, warmup, start, peak, final, total, wd, final_wd):
        self.warmup, self.start, self.peak, self.final, self.total = warmup, start, peak, final, total
        self.wd, self.final_wd, self.count = wd, final_wd, 0

    def step(self):
        self.count += 1
        if self.count < self.warmup:
            lr = self.start + self.count / max(1, self.warmup) * (self.peak - self.start)
        else:
            progress = (self.count - self.warmup) / max(1, self.total - self.warmup)
            lr = max(self.final, self.final + (self.peak - self.final) * 0.5 * (1 + math.cos(math.pi * progress)))
        wd = self.final_wd + (self.wd - self.final_wd) * 0.5 * (1 + math.cos(math.pi * self.count / self.total))
        return lr, min(self.final_wd, wd) if self.final_wd > self.wd else max(self.final_wd, wd)


@pytest.mark.parametrize("offset", [1, 0])
def test_pretraining_schedules_follow_the_official_loop(offset):
    from omegaconf import OmegaConf

    from benchmark.pretrain import Schedule, set_hyperparameters

    cfg = OmegaConf.create(
        {
            "start_lr": 2e-4,
            "lr": 1e-3,
            "final_lr": 1e-6,
            "weight_decay": 0.04,
            "final_weight_decay": 0.4,
            "schedule_offset": offset,
        }
    )
    schedule = Schedule(total_steps=40, warmup_steps=4000 // 400, steps_per_epoch=4)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p], "apply_wd": True}, {"params": [], "apply_wd": False, "weight_decay": 0.0}])
    official = OfficialWarmupCosine(10, 2e-4, 1e-3, 1e-6, 40, 0.04, 0.4)
    for step in range(40):
        lr, wd = set_hyperparameters(opt, cfg, schedule, step)
        if offset:  # the official value of every step, the first one included
            assert (lr, wd) == pytest.approx(official.step(), rel=1e-12)
            assert opt.param_groups[0]["weight_decay"] == wd and opt.param_groups[1]["weight_decay"] == 0.0
        elif step == 0:  # MAE's convention: the schedule at the step itself
            assert (lr, wd) == pytest.approx((2e-4, 0.04))
    assert offset == 0 or set_hyperparameters(opt, cfg, schedule, 0)[0] == pytest.approx(2.0e-4 + 0.8e-3 / 10)
