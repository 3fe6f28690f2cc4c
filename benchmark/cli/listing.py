"""`bench list`: the registered methods and tasks, and the presets of every config group."""

from __future__ import annotations

from rich.table import Table

from benchmark.cli.common import EXIT_OK
from benchmark.tables import print_wide


def _about(path) -> str:
    """The first comment line of a config file: what the preset is."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


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
