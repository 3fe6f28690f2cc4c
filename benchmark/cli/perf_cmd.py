"""`bench perf`: the options checked, the benchmark run, its tables printed and its JSON written."""

from __future__ import annotations

from benchmark.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _fail, err, out
from benchmark.tables import print_wide

STEP_METHODS, DATA_PATH_METHODS = "ijepa,iwm,mae", "ijepa,iwm,mae,dino"


def cmd_perf(args) -> int:
    from benchmark.perf import PRECISIONS, VARIANTS, available_methods, run_benchmark, tables

    methods = (args.methods or (DATA_PATH_METHODS if args.data_path else STEP_METHODS)).split(",")
    precisions, variants = args.precision.split(","), args.variants.split(",")
    rounds = args.rounds if args.rounds is not None else 3 if args.data_path else 1
    known = available_methods()
    unknown = (
        [m for m in methods if m not in known]
        + [p for p in precisions if p not in PRECISIONS]
        + [v for v in variants if v not in VARIANTS]
    )
    if unknown:
        return _fail(
            f"unknown perf method, precision or variant {unknown[0]!r} (methods: the presets of bench list; "
            f"precisions: {', '.join(PRECISIONS)}; variants: {', '.join(VARIANTS)})",
            EXIT_USAGE,
        )
    if args.steps < 1 or args.warmup < 0 or rounds < 1 or args.pairs < 1:
        return _fail("--steps, --rounds and --pairs must be >= 1 and --warmup >= 0", EXIT_USAGE)
    if args.data_path:
        return _data_path(args, methods, rounds)
    if args.official_mae or args.official_dino:
        return _fail("--official-mae and --official-dino time input pipelines: add --data-path", EXIT_USAGE)
    if args.official_ijepa and "ijepa" not in methods:
        return _fail("--official-ijepa times the I-JEPA step: add ijepa to --methods", EXIT_USAGE)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return _fail(f"--device {args.device} but no CUDA device is available", EXIT_USAGE)
    result = _run(
        lambda: run_benchmark(
            methods,
            precisions,
            args.overrides,
            args.steps,
            args.warmup,
            args.device,
            args.threads,
            args.gpu_cases,
            args.compile,
            rounds,
            None if args.no_probe else args.probe,
            {"fp32": args.rtol_fp32, "bf16": args.rtol_bf16},
            args.peak_tflops,
            log=lambda m: err.print(m, highlight=False, markup=False),
            official_ijepa=args.official_ijepa,
            pairs=args.pairs,
            variants=tuple(variants),
        ),
        "perf case",
    )
    if isinstance(result, int):
        return result
    for table in tables(result):
        print_wide(table)
    for method, why in result["skipped"].items():
        out.print(f"skipped {method}: {why}", highlight=False, markup=False)
    differ = [c for c in result["cases"] if c.get("equal_numerics") is False]
    return _write(result, args.out, EXIT_FAILED if differ else EXIT_OK)


def _data_path(args, methods: list[str], rounds: int) -> int:
    """`bench perf --data-path`: each method's input pipeline against the official ones."""
    from benchmark.config import load_config
    from benchmark.perf.datapath import data_path_overrides, data_path_tables, run_data_path
    from benchmark.perf.official_pipelines import check_checkout

    if args.data_images < 1 or args.data_workers < 0 or not 0 < args.mfu <= 1:
        return _fail("--data-images must be >= 1, --data-workers >= 0 and --mfu in (0, 1]", EXIT_USAGE)
    official = {"ijepa": args.official_ijepa, "mae": args.official_mae, "dino": args.official_dino}

    def run():
        from methods import METHODS

        kinds = {
            METHODS[load_config(data_path_overrides(m, args.overrides)).method.name].official_pipeline for m in methods
        }
        for kind, checkout in official.items():
            if checkout is None:
                continue
            check_checkout(kind, checkout)
            if kind not in kinds:
                return _fail(
                    f"--official-{kind} times the official {kind} pipeline: add a method with it to --methods",
                    EXIT_USAGE,
                )
        return run_data_path(
            methods,
            args.overrides,
            {k: v for k, v in official.items() if v},
            args.data_images,
            rounds,
            args.data_workers,
            args.peak_tflops,
            args.mfu,
            log=lambda m: err.print(m, highlight=False, markup=False),
        )

    result = _run(run, "data path")
    if isinstance(result, int):
        return result
    for table in data_path_tables(result):
        print_wide(table)
    return _write(result, args.out, EXIT_OK)


def _run(run, what: str):
    """run()'s result, or the exit code of its failure: a usage error (a bad config, data or perf
    setting), or `what` failed (a RuntimeError)."""
    from benchmark.core.errors import ConfigError, DataError
    from benchmark.perf import PerfError

    try:
        return run()
    except (ConfigError, DataError, PerfError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except RuntimeError as exc:
        return _fail(f"{what} failed: {exc}", EXIT_FAILED)


def _write(result: dict, path: str, code: int) -> int:
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps(result, indent=1))
    out.print(f"results: {path}", highlight=False, markup=False, soft_wrap=True)
    return code
