"""Rich progress bars and the shared console."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1, **fields) -> None:
        if self.progress is not None:
            info = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            self.progress.update(self.task, advance=n, info=info)


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0, enabled: bool = True):
    """A progress bar on stderr; a no-op when disabled or when stderr is not a terminal."""
    if not enabled or not console.is_terminal:
        yield _Bar(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield _Bar(progress, task)
