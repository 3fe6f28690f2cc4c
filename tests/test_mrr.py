"""The world-model MRR task: ranking maths, then the real task on a generated dataset."""

import json

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf
from PIL import Image

from benchmark.config import load_config
from benchmark.core import synthetic
from benchmark.core.data import DataSource
from benchmark.core.layers import gather_tokens
from methods import build_method
from methods.iwm import IWM
from tasks import TaskContext, build_task
from tasks.mrr import block_distances, chance_mrr, rank_of_first


def test_chance_level_is_the_mean_reciprocal_of_a_uniform_rank():
    assert chance_mrr(1) == 1.0
    assert chance_mrr(2) == pytest.approx(0.75)
    assert chance_mrr(4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert 0.0239 < chance_mrr(256) < 0.0240  # H(256) / 256, far above 1/256


def test_rank_of_the_first_entry_with_ties_at_the_mid_rank():
    d = torch.tensor([[0.3, 0.1, 0.5, 0.2], [0.0, 0.1, 0.2, 0.3], [1.0, 1.0, 1.0, 1.0]])
    assert rank_of_first(d).tolist() == [3.0, 1.0, 2.5]


def test_perfect_predictor_scores_one_and_an_action_blind_one_scores_chance():
    gen = torch.Generator().manual_seed(0)
    bank_size, trials = 16, 4000
    bank = torch.randn(trials, bank_size, 5, 8, generator=gen)
    perfect = torch.stack([block_distances(bank[t, 0], bank[t]) for t in range(trials)])
    assert (1 / rank_of_first(perfect)).mean() == 1.0
    constant = torch.randn(5, 8, generator=gen)  # the same guess whatever the action
    blind = torch.stack([block_distances(constant, bank[t]) for t in range(trials)])
    mrr = (1 / rank_of_first(blind)).mean().item()
    # Standard error of the mean reciprocal rank over 4000 uniform ranks of 16 is ~0.0037.
    assert abs(mrr - chance_mrr(bank_size)) < 0.015, (mrr, chance_mrr(bank_size))


class OracleIWM(IWM):
    """A world model that 'knows' the true target: it predicts the true view's latents.

    The task encodes the bank (true view first) before calling the predictor, so the oracle can
    read the true latents there; everything else (masks, positions, gathering, ranking) is the
    task's real code path.
    """

    def target_latents(self, images):
        latents = super().target_latents(images)
        self.true_latents = latents[:1]
        return latents

    def predict(self, context, ctx_idx, tgt_idx, action=None):
        return gather_tokens(self.true_latents.expand(tgt_idx.size(0), -1, -1), tgt_idx)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("gen") / "shapes", 32, 40, 32, seed=3)  # every class in train
    return DataSource("shapes", root, "train", "val", 32)


def method_and_task(name, conditioning="feature", bank=8, images=40, cls=None):
    cfg = OmegaConf.to_container(
        load_config(
            [
                f"method={name}",
                "model.depth=2",
                "model.patch_size=4",
                "method.predictor.depth=1",
                "method.predictor.width=48",
                "data.image_size=32",
                "task=mrr",
                f"tasks.mrr.bank_size={bank}",
                f"tasks.mrr.num_images={images}",
                "tasks.mrr.bf16=false",
                "tasks.mrr.grid_images=3",
            ]
            + ([f"method.predictor.conditioning={conditioning}"] if name == "iwm" else [])
        ),
        resolve=True,
    )
    torch.manual_seed(0)
    if cls is not None:
        method = cls(cfg["model"], cfg["method"], 32)
    else:
        method = build_method(cfg["method"]["name"], cfg["model"], cfg["method"], 32)
    return method, build_task("mrr", cfg["tasks"]["mrr"])


def context(source, tmp_path):
    return TaskContext(
        source=source,
        device=torch.device("cpu"),
        encoder_key="target_encoder",
        seed=0,
        run_dir=tmp_path,
        show_progress=False,
    )


def test_oracle_world_model_ranks_the_true_view_first_and_draws_the_grid(source, tmp_path):
    method, task = method_and_task("iwm", cls=OracleIWM)
    metrics = task.run(method, context(source, tmp_path))
    assert metrics["mrr"] == 1.0 and metrics["top1_retrieval"] == 100.0 and metrics["median_rank"] == 1
    assert metrics["num_images"] == 40 and metrics["bank_size"] == 8
    grid = Image.open(tmp_path / "mrr_retrievals.png")
    # 3 rows of 96-px cells under a 16-px header; source, target and 5 retrieved columns.
    assert grid.size == (7 * 100 + 4, 16 + 3 * 100 + 4)
    # The oracle's first retrieval is the true view, outlined in green.
    x, y = 4 + 2 * 100, 16 + 4
    assert grid.getpixel((x - 1, y + 40)) == (0, 200, 0)


@pytest.mark.parametrize("name,conditioning", [("ijepa", None), ("iwm", "none")])
def test_a_predictor_the_action_cannot_reach_scores_near_chance(source, tmp_path, name, conditioning):
    method, task = method_and_task(name, conditioning or "none", bank=8)
    metrics = task.run(method, context(source, tmp_path))
    # 40 uniform ranks of 8: the standard error of the MRR is ~0.044.
    assert abs(metrics["mrr"] - metrics["chance_mrr"]) < 0.15, metrics
    assert metrics["chance_mrr"] == pytest.approx(chance_mrr(8))


def test_mrr_is_deterministic_for_a_seed(source, tmp_path):
    method, task = method_and_task("iwm", bank=8, images=6)
    a = task.run(method, context(source, tmp_path))
    b = task.run(method, context(source, tmp_path))
    assert a["mrr"] == b["mrr"] and a["median_rank"] == b["median_rank"]


def test_bench_run_iwm_task_mrr_writes_the_record_and_the_grid(bench, tmp_path):
    proc = bench(
        "run",
        "method=iwm",
        "task=mrr",
        "run_dir=results/iwm",
        "tasks.mrr.bank_size=16",
        "tasks.mrr.num_images=8",
        *[o for o in TINY if not o.startswith("tasks.")],
        check=0,
    )
    rec = json.loads((tmp_path / "results/iwm/records/mrr.json").read_text())
    m = rec["metrics"]
    assert 0 < m["mrr"] <= 1 and m["chance_mrr"] == pytest.approx(chance_mrr(16))
    assert m["conditioning"] == "feature" and (tmp_path / "results/iwm/mrr_retrievals.png").is_file()
    assert "mrr" in proc.stdout


def test_bad_bank_size_fails_before_any_compute(bench, tmp_path):
    proc = bench("run", "method=iwm", "task=mrr", "tasks.mrr.bank_size=1", "run_dir=results/x", check=2)
    assert "tasks.mrr" in proc.stderr and "bank_size" in proc.stderr
    assert not (tmp_path / "results/x").exists()
