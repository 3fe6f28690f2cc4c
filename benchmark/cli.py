"""`bench`: the command line.

    bench run [overrides...]      pretrain (or load checkpoint=PATH), then run the selected tasks
    bench list                    registered methods, tasks, datasets and the other config groups
    bench config [overrides...]   print the resolved config without running anything
    bench perf [options] [overrides...]   time the training step of each method and the eval path
    bench export CKPT OUT         write a bench checkpoint in its method's official release layout
    bench sweep SWEEP [overrides] submit a grid of runs (launcher=slurm) or run it here (launcher=local)
    bench status SWEEP            every unit of a sweep: pending / running / done / failed
    bench leaderboard FOLDERS...  tables (Markdown, LaTeX, HTML, CSV) and the MRR spectrum plot
    bench compare A B             paired difference per task with a 95% CI: A better / B better / not
                                  distinguishable

Exit codes: 0 done, 1 a run failed while computing (its record says why), 2 bad input
(unknown name, bad override, missing data folder, unreadable or mismatched checkpoint),
reported in one line before any compute.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmark.tables import compare_table, print_tables, print_wide, seeds_table

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int) -> int:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return code


def cmd_run(overrides: list[str]) -> int:
    # torch loads here, not at import time: `bench --help` and argument errors answer at once.
    from benchmark.config import load_config, seed_overrides
    from benchmark.core import interrupt
    from benchmark.core.errors import CheckpointError, ConfigError, DataError, one_line
    from benchmark.runner import execute, plan_run

    try:
        runs = seed_overrides(load_config(overrides), overrides)
        # Every seed's run is checked before the first one computes.
        plans = [(own, plan_run(load_config(own))) for own in runs]
    except (ConfigError, DataError, CheckpointError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    if all(plan.finished for _, plan in plans):
        for _, plan in plans:
            out.print(
                f"already finished: {plan.run_dir} (every step has its record; nothing to do)",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        return EXIT_OK
    for task, why in plans[0][1].skipped.items():
        out.print(f"skipping task {task}: does not apply ({why})", highlight=False, markup=False, soft_wrap=True)
    if plans[0][1].cfg.launcher.name != "local":
        return max(_submit(own, plan) for own, plan in plans)
    every = []
    for _, plan in plans:
        if plan.finished:
            out.print(f"already finished: {plan.run_dir}", highlight=False, markup=False, soft_wrap=True)
            continue
        try:
            with interrupt.stop_on_sigterm():
                records = execute(plan)
        except interrupt.Interrupted as stopped:
            return _fail(f"stopped: {stopped}; resume with run_dir={plan.run_dir} resume=true", EXIT_FAILED)
        except KeyboardInterrupt:
            return _fail(f"interrupted; resume with run_dir={plan.run_dir} resume=true", EXIT_FAILED)
        except ConfigError as exc:  # refused before any compute (the run folder is in use)
            return _fail(str(exc), EXIT_USAGE)
        except Exception as exc:
            return _fail(f"run failed: {one_line(exc)} (records in {plan.run_dir / 'records'})", EXIT_FAILED)
        if not records:  # a non-zero rank of a data-parallel run: rank 0 reports
            return EXIT_OK
        print_tables(records)
        out.print(f"run folder: {plan.run_dir}", highlight=False, markup=False, soft_wrap=True)
        every += records
    if len(plans) > 1:
        print_wide(seeds_table(every))
    return EXIT_OK


def _about(path) -> str:
    """The first comment line of a config file: what the preset is."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


def _submit(overrides: list[str], plan) -> int:
    from omegaconf import OmegaConf

    from slurm.launcher import log_dir_for, submit

    launcher = OmegaConf.to_container(plan.cfg.launcher)
    job = submit(overrides, launcher, plan.run_dir)
    out.print(
        f"submitted job {job.job_id} ({launcher['name']}): run folder {plan.run_dir}, logs {log_dir_for(plan.run_dir)}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if not launcher.get("wait"):
        return EXIT_OK
    try:
        records = job.results()[0]  # rank 0's records (a data-parallel job has one result per task)
    except Exception as exc:
        return _fail(f"job {job.job_id} failed: {' '.join(str(exc).split())[-400:]}", EXIT_FAILED)
    print_tables(records)
    return EXIT_OK


def cmd_list() -> int:
    from benchmark.config import group_dir, group_options
    from methods import METHODS
    from tasks import TASKS

    table = Table(title="bench list: what method=, task=, data=, model=, pretrain=, launcher= accept")
    for column in ("group", "name", "about"):
        table.add_column(column, overflow="fold")
    for name in sorted(METHODS):
        table.add_row("method (registry)", name, (METHODS[name].__doc__ or "").strip().splitlines()[0])
    for name in sorted(TASKS):
        table.add_row("task (registry)", name, (TASKS[name].__doc__ or "").strip().splitlines()[0])
    for group in ("method", "task", "data", "model", "pretrain", "launcher"):
        for name in group_options(group):
            table.add_row(group, name, _about(group_dir(group) / f"{name}.yaml"))
    print_wide(table)
    return EXIT_OK


def cmd_config(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from benchmark.config import load_config
    from benchmark.core.errors import ConfigError

    try:
        cfg = load_config(overrides)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    out.print(OmegaConf.to_yaml(cfg), highlight=False, markup=False, soft_wrap=True)
    return EXIT_OK


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


def cmd_export(checkpoint: str, target: str, encoder_only: bool) -> int:
    from pathlib import Path

    from benchmark.core.checkpoint import load, save
    from benchmark.core.errors import CheckpointError
    from benchmark.official import to_official

    path = Path(target)
    if path.exists():
        return _fail(f"output file already exists: {path}", EXIT_USAGE)
    try:
        layout, payload = to_official(load(checkpoint), encoder_only)
    except (CheckpointError, KeyError) as exc:
        return _fail(f"cannot export {checkpoint}: {exc}", EXIT_USAGE)
    save(path, payload)
    out.print(
        f"wrote {path}: official {layout} layout ({', '.join(payload)})", highlight=False, markup=False, soft_wrap=True
    )
    return EXIT_OK


def cmd_sweep(name: str, overrides: list[str], retry: bool) -> int:
    from benchmark.core.errors import CheckpointError, ConfigError, DataError
    from slurm.states import unit_states
    from slurm.sweep import load_sweep, submit_sweep

    try:
        sweep = load_sweep(name, overrides)
    except (ConfigError, DataError, CheckpointError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    out.print(
        f"sweep {sweep.name}: {len(sweep.cells)} cells x tasks {', '.join(sweep.tasks) or '-'} "
        f"({sweep.launcher['name']}) -> {sweep.sweep_dir}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    for cell in sweep.cells:
        for task, why in cell.skipped.items():
            out.print(f"skip {cell.name}/{task}: does not apply ({why})", highlight=False, markup=False, soft_wrap=True)
    submitted = []

    def event(line: str) -> None:
        if line.startswith(("submitted", "running")):
            submitted.append(line)
        out.print(line, highlight=False, markup=False, soft_wrap=True)

    try:
        manifest = submit_sweep(sweep, retry=retry, on_event=event)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if not submitted:
        out.print("nothing to submit: every unit is done, queued or running (--retry resubmits failed ones)")
    if sweep.launcher["name"] == "local":
        states = unit_states(sweep.sweep_dir, manifest)
        from slurm.states import FAILED, status_table

        print_wide(status_table(sweep.sweep_dir, states))
        return EXIT_FAILED if any(s.state == FAILED for s in states) else EXIT_OK
    return EXIT_OK


def cmd_status(name: str) -> int:
    from benchmark.core.errors import ConfigError
    from slurm.states import status_table, unit_states
    from slurm.sweep import read_manifest, resolve_sweep_dir

    try:
        sweep_dir = resolve_sweep_dir(name)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    print_wide(status_table(sweep_dir, unit_states(sweep_dir, read_manifest(sweep_dir))))
    return EXIT_OK


def cmd_compare(a: list[str], b: list[str], tasks: str | None = None) -> int:
    from pathlib import Path

    from benchmark.compare import CompareError, compare

    missing = [f for f in (*a, *b) if not Path(f).is_dir()]
    if missing:
        return _fail(f"results folder not found: {missing[0]}", EXIT_USAGE)
    pair = None
    if tasks is not None:
        task_a, sep, task_b = tasks.partition(":")
        if not (sep and task_a and task_b):
            return _fail(f"--tasks takes TASK_OF_A:TASK_OF_B, got {tasks!r}", EXIT_USAGE)
        pair = (task_a, task_b)
    try:
        rows, refused = compare(a, b, pair)
    except CompareError as exc:
        return _fail(str(exc), EXIT_USAGE)
    table = compare_table(rows)
    if rows:
        print_wide(table)
    for line in refused:
        err.print(f"refused {line}", highlight=False, markup=False, soft_wrap=True)
    return EXIT_USAGE if refused else EXIT_OK


def cmd_leaderboard(args) -> int:
    from pathlib import Path

    from benchmark import formats, spectrum
    from benchmark import leaderboard as lb

    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        return _fail(f"results folder not found: {missing[0]}", EXIT_USAGE)
    problems: list[str] = []
    try:
        frame = lb.load_frame(
            args.folders,
            methods=args.method,
            tasks=args.task,
            datasets=args.data,
            since=args.since,
            until=args.until,
            by=args.by,
            all_metrics=args.all_metrics,
            problems=problems,
        )
    except ValueError as exc:  # a malformed --since/--until date
        return _fail(f"bad date: {exc}", EXIT_USAGE)
    for line in problems:
        err.print(f"skipped {line}", highlight=False, markup=False, soft_wrap=True)
    if frame.empty:
        return _fail(f"no successful records match in {', '.join(args.folders)}", EXIT_USAGE)
    board = lb.board(frame, by=args.by)
    out_dir = Path(args.out) if args.out else Path(args.folders[0]) / "leaderboard"
    board.sources = [str(Path(f).resolve()) for f in args.folders]
    title = f"Leaderboard: {', '.join(Path(f).resolve().name for f in args.folders)}"
    runs = frame["run_dir"].nunique()
    print_wide(formats.to_rich(board, f"{runs} runs: mean [95% CI]; bold: best and distinguishable; ≈: not"))
    if board.split:
        out.print(
            formats.legend(board).removeprefix(formats.LEGEND).strip(), highlight=False, markup=False, soft_wrap=True
        )
    figures = []
    points = spectrum.spectrum_points(frame, by=args.by)
    if not points.empty and len(points.columns) > 1:
        figures.append(out_dir / "spectrum.png")
        for what, r in spectrum.spectrum_plot(points, figures[-1]).items():
            if r == r:  # defined: 3 or more runs with a spread
                out.print(
                    f"correlation of mrr with {what}: {r:+.2f} over {len(points)} runs", highlight=False, markup=False
                )
    written = formats.write_tables(board, out_dir, args.digits, title, tuple(figures)) + figures
    out.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False, markup=False, soft_wrap=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench", description="Pretrain and evaluate IWM, I-JEPA and MAE side by side."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="pretrain (or load checkpoint=PATH) and run tasks",
        description="Hydra overrides, e.g. method=ijepa task=all model=vit_small pretrain.epochs=2 seed=1",
    )
    run.add_argument("overrides", nargs="*")
    sub.add_parser("list", help="registered methods, tasks, datasets and config presets")
    config = sub.add_parser("config", help="print the resolved config for the given overrides")
    config.add_argument("overrides", nargs="*")
    perf = sub.add_parser(
        "perf",
        help="time the training step of each method, and the evaluation path",
        description="Config overrides (e.g. model=vit_small pretrain.batch_size=16) apply to "
        "every training-step case on top of the reference configuration.",
    )
    perf.add_argument("overrides", nargs="*")
    perf.add_argument("--methods", default="ijepa,iwm,mae", help="comma-separated method presets of bench list")
    perf.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 or both (default)")
    perf.add_argument("--steps", type=int, default=10, help="timed steps per case")
    perf.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    perf.add_argument("--rounds", type=int, default=1, help="repeat all cases, interleaved")
    perf.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    perf.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    perf.add_argument("--gpu-cases", action="store_true", help="ViT-B/16 224 px cases instead of the CPU ones")
    perf.add_argument("--compile", action="store_true", help="torch.compile the step of the fast variant")
    perf.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for model FLOP utilisation")
    perf.add_argument("--rtol-fp32", type=float, default=1e-4, help="loss tolerance of fast vs eager, fp32")
    perf.add_argument("--rtol-bf16", type=float, default=2e-2, help="loss tolerance of fast vs eager, bf16")
    perf.add_argument(
        "--probe",
        nargs="*",
        default=[],
        metavar="OVERRIDE",
        help="config overrides of the linear-probe timing (default config)",
    )
    perf.add_argument("--no-probe", action="store_true", help="skip the linear-probe timing")
    perf.add_argument(
        "--official-ijepa",
        metavar="DIR",
        default=None,
        help="a checkout of facebookresearch/ijepa: time its I-JEPA step against ours, side by side",
    )
    perf.add_argument("--pairs", type=int, default=6, help="paired passes of ours and the official step")
    perf.add_argument("--out", default="perf.json", help="where the JSON goes")
    export = sub.add_parser(
        "export",
        help="write a bench checkpoint in the official I-JEPA or MAE layout",
        description="I-JEPA/IWM -> the I-JEPA .pth.tar layout; MAE -> {'model': ...} "
        "(encoder + decoder, or the encoder alone with --encoder-only)",
    )
    export.add_argument("checkpoint", help="a checkpoint written by bench run (checkpoints/last.pt)")
    export.add_argument("out", help="the file to write (never overwritten)")
    export.add_argument("--encoder-only", action="store_true", help="MAE: the encoder alone, as mae_pretrain_vit_*.pth")
    sweep = sub.add_parser(
        "sweep",
        help="submit a sweep (grid of runs x tasks) to SLURM, or run it here",
        description="SWEEP: a name in benchmark/conf/sweep or a YAML path; then launcher=slurm|local, "
        "launcher.* (partition, account, ...), grid.KEY=[...], tasks=[...], sweep_dir=PATH, "
        "and overrides for every run",
    )
    sweep.add_argument("sweep")
    sweep.add_argument("overrides", nargs="*")
    sweep.add_argument("--retry", action="store_true", help="resubmit units whose record says failed")
    status = sub.add_parser("status", help="state of every job of a sweep")
    status.add_argument("sweep", help="sweep folder, or sweep name under results/sweeps")
    comp = sub.add_parser(
        "compare",
        help="paired difference of two sides task by task, with a 95%% CI and a verdict",
        description="A and B: folders of records (run, sweep or results folders), one configuration per side; "
        "several folders per side with --a/--b.",
    )
    comp.add_argument("a", nargs="?", help="side A (a folder)")
    comp.add_argument("b", nargs="?", help="side B (a folder)")
    comp.add_argument("--a", dest="a_more", action="append", default=[], help="another folder of side A")
    comp.add_argument("--b", dest="b_more", action="append", default=[], help="another folder of side B")
    comp.add_argument(
        "--tasks",
        metavar="TASK_A:TASK_B",
        help="compare task TASK_A of side A with task TASK_B of side B (same val examples), e.g. "
        "predictor_ft:predictor_ft_random with the same folders on both sides",
    )
    board = sub.add_parser("leaderboard", help="tables and the MRR spectrum plot from result folders")
    board.add_argument("folders", nargs="+")
    board.add_argument("--method", action="append", help="method or preset (repeatable)")
    board.add_argument("--task", action="append", help="task (repeatable; 'pretrain' for pretraining loss)")
    board.add_argument("--data", action="append", help="dataset name (repeatable)")
    board.add_argument("--since", help="records finished at or after this ISO date/time")
    board.add_argument("--until", help="records finished at or before this ISO date/time")
    board.add_argument("--by", action="append", help="config key that splits rows, e.g. pretrain.epochs")
    board.add_argument("--all-metrics", action="store_true", help="every numeric metric, not only each task's headline")
    board.add_argument("--digits", type=int, default=None, help="decimals (default: 1 for %%, 3 for MRR and losses)")
    board.add_argument("--out", help="folder for the tables and plot (default: FIRST_FOLDER/leaderboard)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors already; keep its code
        return int(exc.code or 0)
    from benchmark.config import check_command_line

    try:
        check_command_line(getattr(args, "overrides", None) or [])
    except ValueError as exc:  # ConfigError
        return _fail(str(exc), EXIT_USAGE)
    if args.command == "run":
        return cmd_run(args.overrides)
    if args.command == "perf":
        return cmd_perf(args)
    if args.command == "config":
        return cmd_config(args.overrides)
    if args.command == "export":
        return cmd_export(args.checkpoint, args.out, args.encoder_only)
    if args.command == "sweep":
        return cmd_sweep(args.sweep, args.overrides, args.retry)
    if args.command == "status":
        return cmd_status(args.sweep)
    if args.command == "compare":
        a, b = [args.a] if args.a else [], [args.b] if args.b else []
        if not (a + args.a_more) or not (b + args.b_more):
            return _fail("bench compare needs two sides: bench compare A B", EXIT_USAGE)
        return cmd_compare(a + args.a_more, b + args.b_more, args.tasks)
    if args.command == "leaderboard":
        return cmd_leaderboard(args)
    return cmd_list()


if __name__ == "__main__":
    sys.exit(main())
