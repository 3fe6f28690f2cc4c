"""What every command shares: the exit codes, the two consoles and the one-line error."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int) -> int:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return code
