"""`bench`: the command line.

    bench run [overrides...]      pretrain (or load checkpoint=PATH), then run the selected tasks
    bench list                    registered methods, tasks, datasets and the other config groups
    bench config [overrides...]   print the resolved config without running anything

Exit codes: 0 done, 1 a run failed while computing (its record says why), 2 bad input
(unknown name, bad override, missing data folder, unreadable or mismatched checkpoint),
reported in one line before any compute.
"""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int) -> int:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return code


def _headline(metrics: dict) -> str:
    for key in ("top1", "final_loss"):
        if metrics.get(key) is not None:
            return f"{key} {metrics[key]:.4g}"
    return ""


def summary_table(records: list[dict]) -> Table:
    first = records[0]
    table = Table(title=f"{first['preset']} / {first['model']} / {first['data']} / seed {first['seed']}")
    for column in ("task", "result", "chance", "seconds", "status"):
        table.add_column(column, justify="right" if column in ("chance", "seconds") else "left", no_wrap=True)
    for r in records:
        m = r["metrics"]
        chance = f"{m['chance_top1']:.4g}" if "chance_top1" in m else ""
        table.add_row(r["task"], _headline(m), chance, f"{r['wall_seconds']:.1f}", r["status"])
    return table


def results_table(records: list[dict]) -> Table | None:
    """The paper's shape: rows method, columns tasks, headline metric (top-1 %) in each cell."""
    from benchmark.tables import paper_table

    frame = paper_table(records)
    if frame.empty:
        return None
    table = Table(title="results (top-1 %, val split)")
    table.add_column("method", no_wrap=True)
    for task in frame.columns:
        table.add_column(task, justify="right", no_wrap=True)
    for method, row in frame.iterrows():
        table.add_row(method, *("" if value != value else f"{value:.1f}" for value in row))
    return table


def print_tables(records: list[dict]) -> None:
    out.print(summary_table(records))
    results = results_table(records)
    if results is not None:
        # Never cut a column: the table is as wide as its headers need, even in a log file.
        needed = sum(max(len(str(c.header)), *(len(cell) for cell in c.cells), 6) + 3 for c in results.columns) + 1
        Console(width=max(out.width, needed)).print(results)


def cmd_run(overrides: list[str]) -> int:
    # torch loads here, not at import time: `bench --help` and argument errors answer at once.
    from benchmark.checkpoint import CheckpointError
    from benchmark.config import ConfigError, load_config
    from benchmark.data import DataError
    from benchmark.runner import execute, plan_run

    try:
        plan = plan_run(load_config(overrides))
    except (ConfigError, DataError, CheckpointError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    if plan.cfg.launcher.name != "local":
        return _submit(overrides, plan)
    try:
        records = execute(plan)
    except KeyboardInterrupt:
        return _fail(f"interrupted; resume with run_dir={plan.run_dir} resume=true", EXIT_FAILED)
    except Exception as exc:
        return _fail(f"run failed: {type(exc).__name__}: {exc} (records in {plan.run_dir / 'records'})", EXIT_FAILED)
    print_tables(records)
    out.print(f"run folder: {plan.run_dir}", highlight=False, soft_wrap=True)
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
    out.print(f"submitted job {job.job_id} ({launcher['name']}): run folder {plan.run_dir}, "
              f"logs {log_dir_for(plan.run_dir)}", highlight=False, soft_wrap=True)
    if not launcher.get("wait"):
        return EXIT_OK
    try:
        records = job.result()
    except Exception as exc:
        return _fail(f"job {job.job_id} failed: {' '.join(str(exc).split())[-400:]}", EXIT_FAILED)
    print_tables(records)
    return EXIT_OK


def cmd_list() -> int:
    from benchmark.config import CONF_DIR, group_options
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
            table.add_row(group, name, _about(CONF_DIR / group / f"{name}.yaml"))
    out.print(table)
    return EXIT_OK


def cmd_config(overrides: list[str]) -> int:
    from benchmark.config import ConfigError, load_config
    from omegaconf import OmegaConf

    try:
        cfg = load_config(overrides)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    out.print(OmegaConf.to_yaml(cfg), highlight=False, soft_wrap=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description="Pretrain and evaluate IWM, I-JEPA and MAE side by side.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="pretrain (or load checkpoint=PATH) and run tasks",
                         description="Hydra overrides, e.g. method=ijepa task=all model=vit_small pretrain.epochs=2 seed=1")
    run.add_argument("overrides", nargs="*")
    sub.add_parser("list", help="registered methods, tasks, datasets and config presets")
    config = sub.add_parser("config", help="print the resolved config for the given overrides")
    config.add_argument("overrides", nargs="*")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors already; keep its code
        return int(exc.code or 0)
    if args.command == "run":
        return cmd_run(args.overrides)
    if args.command == "config":
        return cmd_config(args.overrides)
    return cmd_list()


if __name__ == "__main__":
    sys.exit(main())
