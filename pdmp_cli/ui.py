"""Terminal output: the consoles and the progress bars of long work (hidden with --quiet).

Results go to stdout; progress bars and errors go to stderr, so stdout stays clean for pipes.
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
err_console = Console(stderr=True)

__all__ = ["Progress", "console", "err_console", "progress_bar"]


def progress_bar(quiet: bool = False, transient: bool = False) -> Progress:
    """A rich Progress (use as a context manager) with counts, elapsed time and ETA.

    Disabled when quiet, and when stderr is not a terminal (logs get the one-line summaries only).
    """
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=err_console, transient=transient,
                    disable=quiet or not err_console.is_terminal)
