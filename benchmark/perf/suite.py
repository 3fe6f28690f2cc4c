"""The whole benchmark: every case built first, then each measurement in a fresh process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmark.perf.cases import (
    DEFAULT_VARIANTS,
    PRECISIONS,
    _batch_size,
    _sized_data,
    available_methods,
    case_overrides,
)
from benchmark.perf.common import PerfError
from benchmark.perf.report import check_numerics, summarise

# The module each measurement of a child process is run from.
_CHILD_MODULES = {
    "measure_ceiling": "benchmark.perf.measure",
    "time_training_step": "benchmark.perf.measure",
    "time_linear_probe": "benchmark.perf.evaluation",
    "time_task_stages": "benchmark.perf.evaluation",
    "time_against_official": "benchmark.perf.official",
    "time_data_path": "benchmark.perf.datapath",
    "count_step_flops": "benchmark.perf.datapath",
}


def _child(kind: str, kwargs: dict) -> dict:
    """Run one measurement in a fresh interpreter; its result is the last line it prints."""
    module = _CHILD_MODULES[kind]
    code = f"import json, sys; import {module} as m; print(json.dumps(m.{kind}(**json.loads(sys.argv[1]))))"
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{kind} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(
    methods: list[str],
    precisions: list[str],
    overrides: list[str],
    steps: int,
    warmup: int,
    device: str,
    threads: int | None,
    gpu_cases: bool,
    compile: bool,
    rounds: int,
    probe: list[str] | None,
    rtol: dict,
    peak_tflops: float | None,
    log=print,
    official_ijepa: str | None = None,
    pairs: int = 6,
    variants: tuple[str, ...] = DEFAULT_VARIANTS,
) -> dict:
    known = available_methods()
    skipped = {m: f"method={m} is not in this checkout" for m in methods if m not in known}
    methods = [m for m in methods if m in known]
    cases = []
    for method in methods:
        for precision in precisions:
            for variant in variants:
                ov = case_overrides(method, precision, variant, gpu_cases, compile, overrides)
                ov = _sized_data(ov, (steps + warmup) * _batch_size(ov))
                cases.append(
                    {
                        "method": method,
                        "precision": precision,
                        "variant": variant,
                        "overrides": ov,
                        "gpu": gpu_cases,
                        "runs": [],
                    }
                )
    # Every case must build before anything is timed; the data is generated once, here.
    from benchmark.config import load_config
    from benchmark.core.data import resolve_data
    from methods import build_method

    for case in cases:
        cfg = load_config(case["overrides"])
        try:
            build_method(
                cfg.method.name,
                OmegaConf.to_container(cfg.model),
                OmegaConf.to_container(cfg.method),
                cfg.data.image_size,
            )
        except ValueError as exc:
            raise PerfError(f"{case['method']} case does not build: {exc}") from None
        resolve_data(cfg.data, cfg.cache_dir)
    if probe is not None:
        load_config(probe)
    if official_ijepa is not None:
        from benchmark.perf.official import import_official_ijepa

        import_official_ijepa(official_ijepa)  # a wrong folder is refused before anything is timed
    ceilings = [_child("measure_ceiling", {"device": device, "threads": threads})]
    # Rounds interleave the cases, so a change of machine load hits every case alike.
    for r in range(rounds):
        for case in cases:
            log(f"round {r + 1}/{rounds}: {case['method']} {case['precision']} {case['variant']}")
            case["runs"].append(
                _child(
                    "time_training_step",
                    {
                        "overrides": case["overrides"],
                        "steps": steps,
                        "warmup": warmup,
                        "device": device,
                        "threads": threads,
                    },
                )
            )
    ceilings.append(_child("measure_ceiling", {"device": device, "threads": threads}))
    ceiling = {p: max(c[p] for c in ceilings) for p in PRECISIONS}
    for case in cases:
        runs = case.pop("runs")
        case.update({k: runs[0][k] for k in ("losses", "flops", "batch_size", "workers", "threads")})
        case["seconds"] = [s for run in runs for s in run["seconds"]]
        # The machine's speed drifts over minutes (shared hosts): each round's median shows how much.
        case["round_medians_s"] = [statistics.median(run["seconds"]) for run in runs]
        case["loop_seconds"] = [s for run in runs for s in run["loop_seconds"]]
        case["waits"] = [w for run in runs for w in run["waits"]]
        case["data_seconds_per_batch"] = statistics.median(run["data_seconds_per_batch"] for run in runs)
        case["peak_memory_mib"] = max(run["peak_memory_mib"] for run in runs)
        case["flops"] = case["flops"] * len(runs)
        case["losses_every_round"] = [run["losses"] for run in runs]
        case.update(summarise(case, ceiling, peak_tflops))
    check_numerics(cases, rtol)
    result = {
        "device": device,
        "threads": cases[0]["threads"] if cases else threads,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "ceiling_gflops": ceiling,
        "cases": cases,
        "skipped": skipped,
        "loss_rtol": rtol,
        "torch": torch.__version__,
    }
    if official_ijepa is not None and "ijepa" in methods:
        result["official"] = {"checkout": official_ijepa, "batches": steps, "pairs": pairs, "cases": {}}
        for precision in precisions:
            log(f"ijepa {precision}: ours against the official step, {pairs} pairs of passes")
            ov = case_overrides("ijepa", precision, "fast", gpu_cases, compile, overrides)
            result["official"]["cases"][precision] = _child(
                "time_against_official",
                {
                    "checkout": official_ijepa,
                    "overrides": ov,
                    "batches": steps,
                    "pairs": pairs,
                    "device": device,
                    "threads": threads,
                },
            )
    if probe is not None:
        log("linear probe: feature cache and head grid")
        result["linear_probe"] = _child("time_linear_probe", {"overrides": probe, "threads": threads})
        log("task stages: training step with each attention kernel")
        result["task_stages"] = _child("time_task_stages", {"overrides": probe, "threads": threads})
    return result
