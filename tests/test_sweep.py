"""Sweep expansion, what a resubmission submits, and a local sweep that skips and resumes units."""

import json
import shutil

import pytest

from benchmark.core.errors import ConfigError
from slurm.jobs import overrides_for
from slurm.states import DONE, FAILED, NOT_SUBMITTED, PENDING, RUNNING, UnitState
from slurm.sweep import (
    Cell,
    decide,
    expand_grid,
    format_value,
    load_sweep,
    split_overrides,
)


def test_grid_expands_every_combination_in_order():
    cells = expand_grid({"method": ["ijepa", "iwm"], "seed": [0, 1], "pretrain.lr": [1e-3]}, ["model=vit_micro"])
    assert [name for name, _ in cells] == [
        "ijepa_seed0_lr0.001",
        "ijepa_seed1_lr0.001",
        "iwm_seed0_lr0.001",
        "iwm_seed1_lr0.001",
    ]
    assert cells[3][1] == ["model=vit_micro", "method=iwm", "seed=1", "pretrain.lr=0.001"]
    assert format_value([0.1, True, None]) == "[0.1,true,null]"
    with pytest.raises(ConfigError, match="grid.seed must be a non-empty list"):
        expand_grid({"seed": 3}, [])
    with pytest.raises(ConfigError, match="same folder name"):
        expand_grid({"p.a": ["b c", "b/c"]}, [])


def test_overrides_are_split_and_task_settings_go_to_their_task():
    sweep, launcher, cell = split_overrides(
        ["grid.seed=[0,1]", "launcher=slurm", "launcher.qos=high", "sweep_dir=/x", "pretrain.epochs=2"]
    )
    assert sweep == ["grid.seed=[0,1]", "sweep_dir=/x"] and launcher == ["launcher=slurm", "launcher.qos=high"]
    assert cell == ["pretrain.epochs=2"]
    # A task's setting on the command line is an override for every run, not the sweep's task list.
    assert split_overrides(["tasks=[linear]", "tasks.linear.epochs=5"]) == (
        ["tasks=[linear]"],
        [],
        ["tasks.linear.epochs=5"],
    )
    shared = ["seed=0", "tasks.linear.epochs=3", "tasks.mrr.bank=8"]
    assert overrides_for(shared, None) == ["seed=0"]
    assert overrides_for(shared, "linear") == ["seed=0", "tasks.linear.epochs=3"]


def test_sweep_config_is_checked_before_anything_is_written(tmp_path):
    sweep = load_sweep("ci", ["grid.seed=[7]", f"sweep_dir={tmp_path / 's'}", "tasks.linear.epochs=5"])
    assert [c.name for c in sweep.cells] == ["ijepa_seed7", "iwm_seed7"] and sweep.tasks == ["linear"]
    assert "tasks.linear.epochs=5" in sweep.cells[0].overrides
    assert sweep.cells[0].tasks == ["linear"] and sweep.launcher["name"] == "local"
    for args, message in [
        (["tasks=[nope]"], "unknown task 'nope'"),
        (["grid.method=[nope]"], "unknown method 'nope'"),
        (["pretrain.epoch=1"], "unknown config key 'pretrain.epoch'"),
        (["launcher=submitit_local"], "sweeps run with launcher=local or launcher=slurm"),
        (["task=linear"], "is set by the sweep itself"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_sweep("ci", args)
    with pytest.raises(ConfigError, match="unknown sweep 'nope'"):
        load_sweep("nope", [])
    odd = tmp_path / "odd.yaml"
    odd.write_text("grid: {seed: [0]}\ncolour: red\n")
    with pytest.raises(ConfigError, match="unknown sweep key 'colour'"):
        load_sweep(str(odd), [])
    assert not (tmp_path / "s").exists()


def states(cell, pre, linear, retry_record=False):
    def st(unit, spec):
        state, job = spec
        record = {"status": "failed"} if state == FAILED and retry_record else None
        reason = NOT_SUBMITTED if job is None and state == PENDING else ""
        return UnitState(f"{cell.name}/{unit}", state, reason, job, None, record)

    return {f"{cell.name}/pretrain": st("pretrain", pre), f"{cell.name}/linear": st("linear", linear)}


@pytest.mark.parametrize(
    "pre, linear, retry, record, expected",
    [
        ((PENDING, None), (PENDING, None), False, False, (True, None, ["linear"])),  # fresh
        ((DONE, "1"), (DONE, "2"), False, False, (False, None, [])),  # all done
        ((DONE, "1"), (PENDING, None), False, False, (False, None, ["linear"])),  # eval only, no wait
        ((RUNNING, "1"), (PENDING, None), False, False, (False, "1", ["linear"])),  # waits for running job
        ((RUNNING, "1"), (PENDING, "2"), False, False, (False, "1", [])),  # both queued
        ((FAILED, "1"), (FAILED, "2"), False, False, (True, None, ["linear"])),  # killed, no record: resume
        ((FAILED, "1"), (FAILED, "2"), False, True, (False, None, [])),  # failed record: left alone
        ((FAILED, "1"), (FAILED, "2"), True, True, (True, None, ["linear"])),  # ... unless retry
        ((DONE, "1"), (FAILED, "2"), True, True, (False, None, ["linear"])),
    ],
)
def test_decide(pre, linear, retry, record, expected):
    cell = Cell("c", [], ["linear"])
    d = decide(cell, states(cell, pre, linear, retry_record=record), retry)
    assert (d.pretrain, d.after, d.tasks) == expected


@pytest.mark.slow
def test_local_sweep_skips_done_units_and_resumes_unfinished_ones(bench, tmp_path):
    sweep_dir = tmp_path / "sw"
    args = ("sweep", "ci", "grid.method=[ijepa]", "grid.seed=[0]", "launcher=local", f"sweep_dir={sweep_dir}")
    first = bench(*args, check=0)
    assert "running ijepa_seed0/pretrain" in first.stdout and "2 done" in first.stdout
    linear = json.loads((sweep_dir / "ijepa_seed0.linear" / "records" / "linear.json").read_text())
    assert linear["checkpoint"]["path"] == str(sweep_dir / "ijepa_seed0.pretrain" / "checkpoints" / "last.pt")

    again = bench(*args, check=0)
    assert "nothing to submit" in again.stdout and "running ijepa" not in again.stdout

    # A pretraining that stopped before writing its record is continued from its checkpoint, and the
    # task on it runs again; a finished one is left alone.
    pre = sweep_dir / "ijepa_seed0.pretrain"
    first_pre = json.loads((pre / "records" / "pretrain.json").read_text())
    (pre / "records" / "pretrain.json").unlink()
    shutil.rmtree(sweep_dir / "ijepa_seed0.linear")
    resumed = bench(*args, check=0)
    assert "running ijepa_seed0/pretrain" in resumed.stdout and "running ijepa_seed0/linear" in resumed.stdout
    second_pre = json.loads((pre / "records" / "pretrain.json").read_text())
    assert second_pre["metrics"]["final_loss"] == first_pre["metrics"]["final_loss"]
    assert second_pre["metrics"]["steps"] == first_pre["metrics"]["steps"]
    relinear = json.loads((sweep_dir / "ijepa_seed0.linear" / "records" / "linear.json").read_text())
    assert relinear["metrics"]["top1"] == linear["metrics"]["top1"]

    # A run folder holding only its checkpoint (no config.yaml, no record): continued from the
    # checkpoint with the config stored in it, not refused as "already exists".
    (pre / "records" / "pretrain.json").unlink()
    (pre / "config.yaml").unlink()
    shutil.rmtree(pre / "records")
    (pre / "train_log.jsonl").unlink(missing_ok=True)
    adopted = bench(*args, check=0)
    assert "continuing from" in adopted.stdout and "running ijepa_seed0/pretrain" in adopted.stdout
    third_pre = json.loads((pre / "records" / "pretrain.json").read_text())
    assert third_pre["status"] == "ok" and third_pre["metrics"]["steps"] == first_pre["metrics"]["steps"]
    # A task folder with leftovers but neither config.yaml nor checkpoint: moved aside (nothing is
    # deleted) and the unit runs again.
    lin = sweep_dir / "ijepa_seed0.linear"
    shutil.rmtree(lin)
    lin.mkdir()
    (lin / "notes.txt").write_text("mine")
    redone = bench(*args, check=0)
    assert "moved to" in redone.stdout and "running ijepa_seed0/linear" in redone.stdout
    (aside,) = sweep_dir.glob("ijepa_seed0.linear.set-aside-*")
    assert (aside / "notes.txt").read_text() == "mine"
    assert json.loads((lin / "records" / "linear.json").read_text())["status"] == "ok"

    status = bench("status", str(sweep_dir), check=0)
    assert "2 done" in status.stdout
    changed = bench(
        "sweep", "ci", "grid.method=[ijepa]", "grid.seed=[0]", f"sweep_dir={sweep_dir}", "pretrain.epochs=2"
    )
    assert changed.returncode == 2 and "already holds cell ijepa_seed0 with other settings" in changed.stderr


def test_grids_blocks_give_each_cell_its_own_tasks(tmp_path):
    blocks = tmp_path / "blocks.yaml"
    blocks.write_text(
        "grids:\n"
        "  - {grid: {method: [iwm], seed: [0, 1]}, tasks: [linear, mrr]}\n"
        "  - {grid: {method: [mae], seed: [0]}}\n"
        "tasks: [linear]\n"
    )
    sweep = load_sweep(str(blocks), [f"sweep_dir={tmp_path / 's'}"])
    assert [(c.name, c.tasks) for c in sweep.cells] == [
        ("iwm_seed0", ["linear", "mrr"]),
        ("iwm_seed1", ["linear", "mrr"]),
        ("mae_seed0", ["linear"]),  # a block without tasks takes the top-level ones
    ]
    assert sweep.tasks == ["linear", "mrr"]
    same_cell = tmp_path / "same.yaml"
    same_cell.write_text("grids:\n  - {grid: {seed: [0]}, tasks: [linear]}\n  - {grid: {seed: [0]}, tasks: [mrr]}\n")
    with pytest.raises(ConfigError, match="make the same cell 'seed0'"):
        load_sweep(str(same_cell), [])
    both = tmp_path / "both.yaml"
    both.write_text("grid: {seed: [0]}\ngrids:\n  - {grid: {seed: [1]}}\n")
    with pytest.raises(ConfigError, match="sets both grid and grids"):
        load_sweep(str(both), [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("grids:\n  - {seed: [0]}\n")
    with pytest.raises(ConfigError, match=r"grids\[0\] must hold a grid"):
        load_sweep(str(bad), [])
    # An empty grid would run one default cell, silently: refused, as is no grid at all.
    for text in ("grid: {}\ntasks: [linear]\n", "tasks: [linear]\n", "grids:\n  - {grid: {}}\n"):
        bad.write_text(text)
        with pytest.raises(ConfigError, match="must map at least one override key to its values"):
            load_sweep(str(bad), [])
    assert not (tmp_path / "s").exists()
