"""`bench status`: the state of every unit of a sweep."""

from __future__ import annotations

from benchmark.cli.common import EXIT_OK, EXIT_USAGE, _fail
from benchmark.tables import print_wide


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
