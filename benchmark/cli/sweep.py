"""`bench sweep`: a grid of runs submitted (launcher=slurm) or run here (launcher=local)."""

from __future__ import annotations

from benchmark.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _fail, out
from benchmark.tables import print_wide


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
