"""`bench perf`: the options checked, the benchmark run, its tables printed and its JSON written."""

from __future__ import annotations

from benchmark.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _fail, err, out
from benchmark.tables import print_wide


def cmd_perf(args) -> int:
    import json
    from pathlib import Path

    from benchmark.core.errors import ConfigError, DataError
    from benchmark.perf import PRECISIONS, PerfError, available_methods, run_benchmark, tables

    methods = args.methods.split(",")
    precisions = args.precision.split(",")
    known = available_methods()
    unknown = [m for m in methods if m not in known] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        return _fail(
            f"unknown perf method or precision {unknown[0]!r} (methods: the presets of bench list; "
            f"precisions: {', '.join(PRECISIONS)})",
            EXIT_USAGE,
        )
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.pairs < 1:
        return _fail("--steps, --rounds and --pairs must be >= 1 and --warmup >= 0", EXIT_USAGE)
    if args.official_ijepa and "ijepa" not in methods:
        return _fail("--official-ijepa times the I-JEPA step: add ijepa to --methods", EXIT_USAGE)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return _fail(f"--device {args.device} but no CUDA device is available", EXIT_USAGE)
    try:
        result = run_benchmark(
            methods,
            precisions,
            args.overrides,
            args.steps,
            args.warmup,
            args.device,
            args.threads,
            args.gpu_cases,
            args.compile,
            args.rounds,
            None if args.no_probe else args.probe,
            {"fp32": args.rtol_fp32, "bf16": args.rtol_bf16},
            args.peak_tflops,
            log=lambda m: err.print(m, highlight=False, markup=False),
            official_ijepa=args.official_ijepa,
            pairs=args.pairs,
        )
    except (ConfigError, DataError, PerfError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except RuntimeError as exc:
        return _fail(f"perf case failed: {exc}", EXIT_FAILED)
    for table in tables(result):
        print_wide(table)
    for method, why in result["skipped"].items():
        out.print(f"skipped {method}: {why}", highlight=False, markup=False)
    Path(args.out).write_text(json.dumps(result, indent=1))
    out.print(f"results: {args.out}", highlight=False, markup=False, soft_wrap=True)
    differ = [c for c in result["cases"] if c.get("equal_numerics") is False]
    return EXIT_FAILED if differ else EXIT_OK
