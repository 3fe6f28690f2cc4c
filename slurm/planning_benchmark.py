"""How long and how much memory does `bench sweep` take to plan and submit a sweep over
multi-GB checkpoints? A benchmark, not a test.

    python -m slurm.planning_benchmark [--files 2] [--seeds 6] [--folder DIR] [--out planning_benchmark.json]

Writes `--files` MAE ViT-H/14 encoder files in the released layout (`mae_pretrain_vit_huge.pth`:
{'model': ...}, 632M parameters, 2.5 GB each; zeros, the values are never read) unless they are in
`--folder` already, then times, on one core (`taskset`, threads=1), two ways of planning:

    sweep    `bench sweep` of the grid checkpoint x seed (files x seeds cells, tasks linear and
             knn, method=mae_paper model=vit_huge at 224 px) as a subprocess: every cell planned
             (method on the meta device, checkpoint read by names and shapes) and submitted to the
             local cluster (`launcher=slurm_localhost`; the jobs are cancelled at once), or with
             `launcher=local` planned only when the cluster is not up (`--plan-only`)
    verify   what a local `bench run checkpoint=...` does for one cell: the file loaded and
             checked to its last byte and the method built for real (once, not per cell)

Prints wall seconds and peak resident memory of each (`/usr/bin/time -v`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CELL = ["method=mae_paper", "model=vit_huge", "data.image_size=224"]


def write_files(folder: Path, count: int) -> list[Path]:
    from benchmark.config import load_config
    from methods.mae import MAEEncoder

    cfg = load_config(CELL)
    m = cfg.model
    with torch.device("meta"):
        encoder = MAEEncoder(cfg.data.image_size, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio)
    paths = []
    for i in range(count):
        path = folder / f"mae_pretrain_vit_huge_{i}.pth"
        if not path.is_file():
            weights = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in encoder.state_dict().items()}
            torch.save({"model": weights}, path)
            del weights
        paths.append(path)
    return paths


def timed(command: list[str], cwd: Path) -> dict:
    """Wall seconds and peak RSS (MiB) of a command pinned to one core, via /usr/bin/time -v."""
    pinned = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    env_threads = ["env", "OMP_NUM_THREADS=1"]
    started = time.perf_counter()
    proc = subprocess.run(
        [*env_threads, "/usr/bin/time", "-v", *pinned, *command], cwd=cwd, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {
        "seconds": round(wall, 2),
        "peak_mib": round(int(peak.group(1)) / 1024, 1) if peak else None,
        "returncode": proc.returncode,
        "tail": (proc.stdout + proc.stderr).strip().splitlines()[-3:],
    }


def cancel(sweep_dir: Path) -> int:
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    ids = sorted({job["job_id"].split("_")[0] for job in manifest["jobs"].values() if "job_id" in job})
    if ids:
        subprocess.run(["scancel", *ids], check=False)
    return len(manifest["jobs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--folder", type=Path, default=None, help="where the checkpoint files are (kept)")
    parser.add_argument("--plan-only", action="store_true", help="launcher=local: plan the cells, submit nothing")
    parser.add_argument("--out", type=Path, default=Path("planning_benchmark.json"))
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="planning-benchmark-"))
    folder.mkdir(parents=True, exist_ok=True)
    files = write_files(folder, args.files)
    work = Path(tempfile.mkdtemp(prefix="planning-run-"))
    grid = {"checkpoint": [str(p) for p in files], "seed": list(range(args.seeds))}
    sweep_file = work / "vith_checkpoints.yaml"
    sweep_file.write_text(json.dumps({"grid": grid, "tasks": ["linear", "knn"], "overrides": CELL}))
    launcher = "launcher=slurm_localhost"
    sweep_cmd = [sys.executable, "-m", "benchmark.cli", "sweep", str(sweep_file), launcher]
    sweep_cmd += [f"sweep_dir={work / 'sweep'}", "threads=1"]
    result = {"cells": args.files * args.seeds, "file_gb": round(files[0].stat().st_size / 2**30, 2)}
    if args.plan_only:  # launcher=local would run the units after planning: plan them only
        sweep_args = ["threads=1", f"sweep_dir={work / 'sweep'}"]
        code = (
            "from slurm.sweep import load_sweep; "
            f"s = load_sweep({str(sweep_file)!r}, {sweep_args!r}); "
            "print(len(s.cells), 'cells planned')"
        )
        result["sweep"] = timed([sys.executable, "-c", code], ROOT)
        result["sweep"]["what"] = "plan only (load_sweep), no cluster"
    else:
        result["sweep"] = timed(sweep_cmd, ROOT)
        result["sweep"]["what"] = "plan and submit to the local cluster"
        if (work / "sweep" / "sweep.json").is_file():
            result["sweep"]["jobs_submitted_then_cancelled"] = cancel(work / "sweep")
    one_cell = [*CELL, f"checkpoint={files[0]}", "task=linear", f"run_dir={work / 'one'}"]
    verify = (
        "from benchmark.config import load_config; from benchmark.runner import plan_run; "
        f"p = plan_run(load_config({one_cell!r})); "
        "print('verified', type(p.method).__name__)"
    )
    result["verify"] = timed([sys.executable, "-c", verify], ROOT)
    result["verify"]["what"] = "one cell loaded and checked to the last byte (a local bench run)"
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    if args.folder is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
