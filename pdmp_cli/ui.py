"""Terminal output: one rich console and the progress bars of long work (hidden with --quiet)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
err_console = Console(stderr=True)

__all__ = ["Progress", "console", "err_console", "progress_bar"]


@contextlib.contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Progress | None]:
    """A rich Progress with counts, elapsed time and ETA; None when quiet."""
    if quiet:
        yield None
        return
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield progress
