"""Planning builds no model: the method a run is checked against lives on the meta device, and
a checkpoint planned for submission is read by its names and shapes only; `execute` builds or
loads the real one."""

import json
import zipfile

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf

from benchmark.config import load_config
from benchmark.core import checkpoint as ckpt
from benchmark.core.errors import CheckpointError, ConfigError
from benchmark.planning import is_planned
from benchmark.runner import materialize, plan_run
from methods import build_method

MAE_TINY = ["method=mae", "method.predictor.depth=1", "method.predictor.width=48", "method.predictor.num_heads=3"]


def config(tmp_path, *extra):
    return load_config([*TINY, f"cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", *extra])


def corrupt_a_tensor(path):
    """Flip one byte inside the largest tensor record of a zip-format checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_plan_holds_a_meta_method_and_execute_builds_the_seeded_one(tmp_path):
    cfg = config(tmp_path, "method=iwm")
    rng = torch.get_rng_state()
    plan = plan_run(cfg)
    assert is_planned(plan.method) and plan.method.encoder.blocks[0].attn.qkv.weight.is_meta
    assert torch.equal(torch.get_rng_state(), rng), "planning leaves the global RNG alone"
    assert plan.method.capabilities.conditioned and plan.task_names == ["linear"]
    real = materialize(plan)
    assert not is_planned(real)
    torch.manual_seed(cfg.seed)
    expected = build_method("iwm", *(OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "method")), 64)
    for key, value in expected.state_dict().items():
        assert torch.equal(real.state_dict()[key], value), key


def test_a_checkpoint_planned_for_submission_is_read_by_names_and_shapes(tmp_path):
    """A flipped byte in a tensor: the submitting plan does not read it, the verifying plan (what
    the job does where it runs, and a local run) refuses the file; a wrong architecture is refused
    by both."""
    cfg = config(tmp_path)
    method = build_method(
        "ijepa", *(OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "method")), cfg.data.image_size
    )
    path = tmp_path / "last.pt"
    ckpt.save(path, {"method": method.checkpoint_state()})
    corrupt_a_tensor(path)
    plan = plan_run(config(tmp_path, f"checkpoint={path}"), verify_checkpoint=False)
    assert is_planned(plan.method) and plan.method.capabilities.predictor
    with pytest.raises(CheckpointError, match="corrupt: checksum mismatch"):
        plan_run(config(tmp_path, f"checkpoint={path}"))
    with pytest.raises(CheckpointError, match="depth=2 \\(config 3\\)"):
        plan_run(config(tmp_path, f"checkpoint={path}", "model.depth=3"), verify_checkpoint=False)


def test_an_official_encoder_only_file_plans_without_a_predictor(tmp_path):
    """MAE's encoder-only release: the planned method has no decoder, so the predictor tasks do
    not apply, exactly as after a real load."""
    cfg = config(tmp_path, *MAE_TINY)
    method = build_method(
        "mae", *(OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "method")), cfg.data.image_size
    )
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": method.encoder.state_dict()}, path)
    planned = plan_run(config(tmp_path, *MAE_TINY, f"checkpoint={path}", "task=all"), verify_checkpoint=False)
    loaded = plan_run(config(tmp_path, *MAE_TINY, f"checkpoint={path}", "task=all", "run_dir=b"))
    assert is_planned(planned.method) and not is_planned(loaded.method)
    assert planned.method.predictor is None and not planned.method.capabilities.predictor
    assert planned.task_names == loaded.task_names and planned.skipped == loaded.skipped
    assert "predictor_ft" in planned.skipped


def test_a_sweep_over_a_checkpoint_evaluates_it_and_refuses_a_bad_cell_first(bench, tmp_path):
    """Cells given a checkpoint have no pretraining unit; planning every cell by shapes still
    finds the cell the checkpoint does not fit, before anything is submitted."""
    cfg = config(tmp_path)
    method = build_method(
        "ijepa", *(OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "method")), cfg.data.image_size
    )
    ckpt.save(tmp_path / "last.pt", {"method": method.checkpoint_state()})
    sweep = tmp_path / "grid.yaml"
    sweep.write_text("grid:\n  model.depth: [2, 3]\ntasks: [linear]\noverrides: []\n")
    tiny = [o for o in TINY if not o.startswith("model.depth")]
    given = f"checkpoint={tmp_path / 'last.pt'}"
    proc = bench("sweep", str(sweep), *tiny, given, f"sweep_dir={tmp_path / 'bad'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "depth=2 (config 3)" in proc.stderr and not (tmp_path / "bad").exists()

    sweep.write_text("grid:\n  seed: [0, 1]\ntasks: [linear]\noverrides: []\n")
    proc = bench("sweep", str(sweep), *TINY, given, f"sweep_dir={tmp_path / 'sw'}", "launcher=local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sorted(manifest["jobs"]) == ["seed0/linear", "seed1/linear"]  # no pretraining unit
    assert manifest["cells"]["seed0"]["checkpoint"] == str(tmp_path / "last.pt")
    record = json.loads((tmp_path / "sw" / "seed0.linear" / "records" / "linear.json").read_text())
    assert record["status"] == "ok" and record["checkpoint"]["path"] == str(tmp_path / "last.pt")
    status = bench("status", str(tmp_path / "sw"))
    assert status.returncode == 0 and "pretrain" not in status.stdout and status.stdout.count("done") >= 2


def test_config_errors_still_come_from_planning(tmp_path):
    with pytest.raises(ConfigError, match="method.predictor.width"):
        plan_run(config(tmp_path, "method.predictor.width=50", "method.predictor.num_heads=3"))
