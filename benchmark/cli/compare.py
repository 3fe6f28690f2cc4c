"""`bench compare`: the paired difference of two sides per task, with a 95% CI and a verdict."""

from __future__ import annotations

from benchmark.cli.common import EXIT_OK, EXIT_USAGE, _fail, err
from benchmark.tables import compare_table, print_wide


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
