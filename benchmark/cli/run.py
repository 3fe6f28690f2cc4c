"""`bench run`: pretrain (or load checkpoint=PATH), then run the selected tasks, here or submitted."""

from __future__ import annotations

from benchmark.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _fail, out
from benchmark.tables import print_tables, print_wide, seeds_table


def cmd_run(overrides: list[str]) -> int:
    # torch loads here, not at import time: `bench --help` and argument errors answer at once.
    from benchmark.config import load_config, seed_overrides
    from benchmark.core import interrupt
    from benchmark.core.errors import CheckpointError, ConfigError, DataError, one_line
    from benchmark.runner import execute, plan_run

    try:
        runs = seed_overrides(load_config(overrides), overrides)
        # Every seed's run is checked before the first one computes; a run submitted elsewhere
        # reads its checkpoint's names and shapes only (the job verifies it where it runs).
        configs = [(own, load_config(own)) for own in runs]
        plans = [(own, plan_run(cfg, verify_checkpoint=cfg.launcher.name == "local")) for own, cfg in configs]
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
