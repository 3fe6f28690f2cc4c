import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_MODEL


def run_dirs(root: Path):
    return sorted(p for p in (root / "results").glob("*") if p.is_dir()) if (root / "results").exists() else []


@pytest.mark.parametrize(
    "args, message",
    [
        (["method=nope"], "unknown method 'nope'"),
        (["seed=1", "seed=2"], "seed is set 2 times (seed=1 seed=2): give it once (seeds=[1,2] runs several seeds)"),
        (["task=nope"], "unknown task 'nope'"),
        (["pretrain.epoch=2"], "unknown config key 'pretrain.epoch' (did you mean pretrain.epochs?)"),
        (["pretrain.epochs=many"], "pretrain.epochs must be a number"),
        (["pretrain.batch_size=0"], "pretrain.batch_size must be > 0"),
        (["method.mask.target_scale=[0.1,1.5]"], "method.mask.target_scale must satisfy"),
        (["data=folder", "data.root=/definitely/not/here"], "data folder not found: /definitely/not/here/train"),
        (["data=folder"], "needs a folder"),
        (["model=vit_small"], "can never keep more than min_keep"),
        (["checkpoint=/no/such.pt"], "checkpoint not found: /no/such.pt"),
        (["seed"], "bad override"),
        (["method=iwm", "method.views.solarize=1.5"], "view probability solarize must be in [0, 1]"),
        (["method=iwm", "method.predictor.conditioning=film"], "predictor conditioning must be one of"),
        (["data=folder", "data.num_train=5"], "unknown config key 'data.num_train' with data=folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bench, tmp_path, args, message):
    proc = bench("run", *TINY_MODEL, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_dirs(tmp_path) == []


def test_list_names_the_registries(bench):
    proc = bench("list", check=0)
    for name in (
        "ijepa",
        "linear",
        "all",
        "shapes",
        "folder",
        "imagenet",
        "vit_micro",
        "vit_base",
        "cpu",
        "paper",
        "local",
    ):
        assert name in proc.stdout


def test_run_end_to_end_writes_records_and_refuses_to_overwrite(bench, tmp_path):
    # task=all with every adapter is tests/test_tasks_cli.py's.
    proc = bench("run", "method=ijepa", "task=linear", "seed=3", "run_dir=results/r1", *TINY, check=0)
    assert "linear" in proc.stdout and "top1" in proc.stdout
    run = tmp_path / "results" / "r1"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    log = [json.loads(line) for line in open(run / "train_log.jsonl")]
    assert log[-1]["step"] == 6  # 96 images / batch 16, one epoch

    rec = json.loads((run / "records" / "linear.json").read_text())
    assert rec["status"] == "ok" and rec["method"] == "ijepa" and rec["preset"] == "ijepa"
    assert rec["task"] == "linear" and rec["model"] == "vit_micro" and rec["data"] == "shapes" and rec["seed"] == 3
    assert rec["checkpoint"] == {"path": str(run / "checkpoints" / "last.pt"), "key": "target_encoder"}
    assert rec["config"]["model"]["depth"] == 2 and rec["config"]["seed"] == 3
    assert rec["git_commit"] is None or len(rec["git_commit"]) >= 40
    assert rec["host"] and rec["wall_seconds"] > 0
    m = rec["metrics"]
    assert 0 <= m["top1"] <= 100 and m["chance_top1"] == pytest.approx(100 / 12) and m["num_classes"] == 12
    assert m["val_samples"] == 48 and m["train_samples"] + m["heldout_samples"] == 96
    best = max(m["grid"], key=lambda row: row["heldout_top1"])
    assert m["top1"] == best["val_top1"] and m["best_lr"] == best["lr"]
    pre = json.loads((run / "records" / "pretrain.json").read_text())
    assert pre["metrics"]["steps"] == 6 and pre["metrics"]["final_loss"] > 0

    again = bench("run", "run_dir=results/r1", *TINY)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert json.loads((run / "records" / "linear.json").read_text()) == rec


def test_task_on_a_checkpoint_skips_pretraining_and_checks_architecture(bench, tmp_path):
    bench("run", "run_dir=results/src", *TINY, check=0)
    ckpt = tmp_path / "results" / "src" / "checkpoints" / "last.pt"
    proc = bench("run", f"checkpoint={ckpt}", "checkpoint_key=encoder", "run_dir=results/eval", *TINY, check=0)
    run = tmp_path / "results" / "eval"
    assert not (run / "records" / "pretrain.json").exists()
    rec = json.loads((run / "records" / "linear.json").read_text())
    assert rec["checkpoint"] == {"path": str(ckpt), "key": "encoder"}
    assert "linear" in proc.stdout

    wrong = bench("run", f"checkpoint={ckpt}", *TINY[:1], "model.depth=3", *TINY[2:])
    assert wrong.returncode == 2 and "does not match model" in wrong.stderr and "depth=2" in wrong.stderr


def test_resume_continues_a_stopped_run(bench, tmp_path):
    bench("run", "run_dir=results/r", *TINY, "pretrain.epochs=2", check=0)
    first = json.loads((tmp_path / "results/r/records/linear.json").read_text())
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "results/r").rglob("*") if p.is_file()}
    proc = bench("run", "run_dir=results/r", "resume=true", *TINY, "pretrain.epochs=2", check=0)
    again = json.loads((tmp_path / "results/r/records/linear.json").read_text())
    assert again == first  # a finished run is left alone: nothing rerun, nothing rewritten
    assert "already finished" in proc.stdout
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "results/r").rglob("*") if p.is_file()}
    changed = bench("run", "run_dir=results/r", "resume=true", *TINY, "pretrain.epochs=3")
    assert changed.returncode == 2 and "pretrain.epochs" in changed.stderr
    assert torch.load(tmp_path / "results/r/checkpoints/last.pt", weights_only=True)["step"] == 12


def test_submitit_launcher_runs_the_same_job_in_a_background_process(bench, tmp_path):
    proc = bench("run", "launcher=submitit_local", "launcher.cpus_per_task=1", "run_dir=results/sub", *TINY, check=0)
    assert "submitted job" in proc.stdout and "linear" in proc.stdout
    rec = json.loads((tmp_path / "results/sub/records/linear.json").read_text())
    assert rec["status"] == "ok" and rec["config"]["launcher"]["name"] == "local"
    # A 1-CPU job runs one torch thread, whatever the machine has.
    assert (rec["threads"], rec["threads_from"]) == (1, "threads")
    assert list((tmp_path / "results/.submitit/sub").glob("*_log.out"))


def test_a_run_folder_in_use_is_refused_and_a_dead_holder_does_not_block(bench, tmp_path):
    import subprocess
    import sys

    from benchmark.runner import run_lock

    PRETRAIN_ONLY = [*(o for o in TINY if not o.startswith("tasks.")), "pretrain.epochs=1", "task=none"]

    bench("run", "run_dir=results/r", *PRETRAIN_ONLY, check=0)
    run = tmp_path / "results/r"
    (run / "records/pretrain.json").unlink()  # as if stopped before its record: resume has work
    with run_lock(run):  # another live process holds the folder
        busy = bench("run", "run_dir=results/r", "resume=true", *PRETRAIN_ONLY)
    assert busy.returncode == 2 and f"run folder {run} is in use by another process (pid " in busy.stderr
    assert not (run / "records/pretrain.json").exists()
    # A holder killed while holding the lock leaves the file behind, not the lock.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from benchmark.runner import run_lock\n"
            f"import pathlib, time\nwith run_lock(pathlib.Path({str(run)!r})):\n"
            f"    print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    bench("run", "run_dir=results/r", "resume=true", *PRETRAIN_ONLY, check=0)
    assert json.loads((run / "records/pretrain.json").read_text())["status"] == "ok"


def test_resume_needs_only_the_run_folder(bench, tmp_path):
    started = [*(o for o in TINY if not o.startswith("tasks.")), "pretrain.epochs=1", "task=none", "seed=4"]
    bench("run", "run_dir=results/r", *started, check=0)
    (tmp_path / "results/r/records/pretrain.json").unlink()  # as if stopped before its record
    proc = bench("run", "run_dir=results/r", "resume=true", "workers=0", check=0)  # no other override
    record = json.loads((tmp_path / "results/r/records/pretrain.json").read_text())
    assert record["status"] == "ok" and record["seed"] == 4 and record["config"]["model"]["depth"] == 2
    assert "pretrain" in proc.stdout
    refused = bench("run", "run_dir=results/r", "resume=true", "seed=5")
    assert refused.returncode == 2 and "seed=5 (stored: 4)" in refused.stderr
