"""The random-init control: every task again on the encoder as built from the run's seed, and the
gain over it in the run summary, `bench compare` and the leaderboard."""

import json

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf

from benchmark.compare import compare, control_gains
from benchmark.config import load_config
from benchmark.formats import to_markdown
from benchmark.leaderboard import board, load_frame
from benchmark.records import read_records
from benchmark.runner import control_method, materialize, plan_run

TASKS = ["tasks.linear.epochs=2"]


def _records(run_dir):
    return {p.name: json.loads(p.read_text()) for p in (run_dir / "records").glob("*.json")}


def test_control_weights_are_the_weights_pretraining_starts_from(tmp_path, cache_dir):
    cfg = load_config([*TINY, f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", "control=true"])
    plan = plan_run(cfg)
    assert plan.method.encoder.patch_embed.proj.weight.is_meta  # planning builds no weights
    before = {k: v.clone() for k, v in materialize(plan).state_dict().items()}
    control = control_method(plan)
    after = control.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Another seed builds other weights: the control is the run's own seed, not a fixed one.
    other = control_method(plan_run(load_config([*TINY, f"cache_dir={cache_dir}", "seed=1", "control=true"])))
    assert not torch.equal(
        other.state_dict()["encoder.patch_embed.proj.weight"], after["encoder.patch_embed.proj.weight"]
    )


@pytest.mark.parametrize(
    "choice, overrides, expected",
    [("all", [], True), ("linear", [], False), ("all", ["control=false"], False), ("linear", ["control=true"], True)],
)
def test_control_auto_is_on_for_task_all_on_builtin_data(cache_dir, choice, overrides, expected):
    cfg = load_config([*TINY, f"cache_dir={cache_dir}", f"task={choice}", *overrides])
    assert plan_run(cfg).control is expected
    assert plan_run(cfg).config["control"] is expected  # recorded as resolved


def test_control_must_be_a_boolean_or_auto(bench):
    proc = bench("run", *TINY, "control=maybe", check=2)
    assert "control must be true, false or auto" in proc.stderr


def test_without_pretraining_the_control_equals_the_run(bench, tmp_path):
    """pretrain.epochs=0 evaluates the initial weights twice: the two arms must agree exactly, and
    their gain is 0 with a verdict of no difference (the check that the control is that init)."""
    run = tmp_path / "zero"
    proc = bench("run", *TINY, *TASKS, "pretrain.epochs=0", "control=true", f"run_dir={run}", check=0)
    recs = _records(run)
    assert {"linear.json", "linear.random_init.json"} <= set(recs)
    main, control = recs["linear.json"], recs["linear.random_init.json"]
    assert main["init"] == "pretrained" and control["init"] == "random" and control["task"] == "linear"
    assert main["metrics"]["top1"] == control["metrics"]["top1"]
    gain = control_gains(read_records(run))["linear"]
    assert gain.difference.mean == 0 and gain.verdict == "not distinguishable"
    assert "gain over random init" in proc.stdout and "(random init)" in proc.stdout


def test_control_after_pretraining_everywhere(bench, tmp_path):
    """A pretrained run with its control: separate records and evidence, the gain in the summary,
    in compare (per side) and on the leaderboard, and controls never ranked as pretrained runs."""
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"s{seed}"
        proc = bench(
            "run", *TINY, *TASKS, "pretrain.epochs=2", "control=true", f"seed={seed}", f"run_dir={run}", check=0
        )
        runs.append(run)
        recs = _records(run)
        assert {"pretrain.json", "linear.json", "linear.random_init.json"} <= set(recs)
        assert (run / "records" / "linear.random_init.examples.npz").is_file()
        gain = control_gains(read_records(run))["linear"]
        expected = recs["linear.json"]["metrics"]["top1"] - recs["linear.random_init.json"]["metrics"]["top1"]
        assert gain.difference.mean == pytest.approx(expected)
        assert gain.difference.low <= expected <= gain.difference.high
        assert f"{expected:+.1f}" in proc.stdout  # top-1 at one decimal, as everywhere
        # The saved config records the control as resolved.
        assert OmegaConf.load(run / "config.yaml").control is True

    # compare: the pretrained records pair with each other (never with a control), and each side's
    # gain over its control is shown.
    rows, refused = compare(runs, runs)
    (row,) = [r for r in rows if r.task == "linear"]
    assert not refused and row.difference.mean == 0
    assert row.gain_a is not None and row.gain_a.seeds == [0, 1]
    proc = bench("compare", str(runs[0]), str(runs[0]), check=0)
    assert "A gain over random init" in proc.stdout

    # The leaderboard: a gain column after the task's, from both seeds; the control is not a row.
    b = board(load_frame(runs))
    assert len(b.mean.index) == 1
    assert ("linear", "top1 gain") in b.mean.columns
    means = [_records(r)["linear.json"]["metrics"]["top1"] for r in runs]
    controls = [_records(r)["linear.random_init.json"]["metrics"]["top1"] for r in runs]
    assert b.mean.at[b.mean.index[0], ("linear", "top1")] == pytest.approx(sum(means) / 2)
    gain = b.mean.at[b.mean.index[0], ("linear", "top1 gain")]
    assert gain == pytest.approx((sum(means) - sum(controls)) / 2)
    assert "linear top1 gain" in to_markdown(b)


def test_seeds_table_pairs_every_seed_with_its_control(bench, tmp_path):
    """seeds=2 with the control: each seed's folder holds both arms, and the table over seeds
    gives the gain paired over both seeds (0 here: without pretraining the arms are the same)."""
    run = tmp_path / "multi"
    proc = bench("run", *TINY, *TASKS, "pretrain.epochs=0", "control=true", "seeds=2", f"run_dir={run}", check=0)
    for seed in (0, 1):
        assert (run / f"seed{seed}" / "records" / "linear.random_init.json").is_file()
    gain = control_gains(read_records(run))["linear"]
    assert gain.seeds == [0, 1] and gain.difference.mean == 0
    assert "mean [95% CI over seeds]" in proc.stdout and "+0.0 [+0.0, +0.0]" in proc.stdout
